"""`visenv cache import|build|stats|verify|export|fidelity`, on a parser built with add_cache_commands."""

import argparse
import json
import os
import sqlite3

import pytest

from cache_fixtures import request, write_png
from loopback_images import ImageServer
from visenv.cache_cli import add_cache_commands
from visenv.error import ConfigError
from visenv.tools.cache import ExactCacheBackend, ToolCache

T2I = "tool_text2image_qwen"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="visenv")
    add_cache_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def calls_file(folder, lines):
    path = folder / "calls.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def imported(tmp_path, capsys):
    folder = tmp_path / "mine"
    for i in range(3):
        write_png(folder, f"{i}.png", i)
    calls_file(folder, [{"tool": T2I, "arguments": {"prompt": f"picture {i}"}, "file": f"{i}.png"} for i in range(3)])
    cache = tmp_path / "cache"
    assert run("cache", "import", cache, folder, "--quiet") == 0
    assert "imported 3 entries" in capsys.readouterr().out
    return cache


def test_import_stats_export(imported, tmp_path, capsys):
    ExactCacheBackend(imported).answer(request(T2I, {"prompt": "picture 1"}, seed=5))
    assert run("cache", "stats", imported) == 0
    out = capsys.readouterr().out
    assert "3 entries, 3 files" in out and T2I in out and "100.0%" in out
    assert run("cache", "stats", imported, "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tools"][T2I]["entries"] == 3 and stats["tools"][T2I]["exact_hit"] == 1
    assert run("cache", "export", imported, tmp_path / "out", "--quiet") == 0
    assert "exported 3 entries" in capsys.readouterr().out
    assert len((tmp_path / "out" / "calls.jsonl").read_text().splitlines()) == 3
    assert run("cache", "import", tmp_path / "again", tmp_path / "out", "--quiet") == 0


def test_verify_exit_status(imported, capsys):
    assert run("cache", "verify", imported, "--quiet") == 0
    assert "0 missing, 0 corrupt" in capsys.readouterr().out
    victim = next(ToolCache(imported).entries()).outputs[0].path
    os.remove(victim)
    assert run("cache", "verify", imported, "--quiet", "--no-hash") == 1
    assert "1 missing, 0 corrupt, 1 entries quarantined" in capsys.readouterr().out


def test_build_over_http_resumes(tmp_path, capsys):
    calls = calls_file(tmp_path, [{"tool": T2I, "arguments": {"prompt": f"fox {i}"}, "seed": i} for i in range(4)])
    cache = tmp_path / "cache"
    with ImageServer() as server:
        server.script.extend(["ok", "400"])
        assert run("cache", "build", cache, calls, "--url", server.url, "--model", "m", "--quiet",
                   "--concurrency", "2", "--retries", "0") == 1
        captured = capsys.readouterr()
        assert "recorded 3, already cached 0, failed 1" in captured.out
        assert "line " in captured.err and "safety system" in captured.err
        assert run("cache", "build", cache, calls, "--url", server.url, "--model", "m", "--quiet") == 0
        assert "recorded 1, already cached 3, failed 0" in capsys.readouterr().out
        assert len(server.requests) == 5
    assert len(ToolCache(cache)) == 4


def test_build_with_a_python_callable(tmp_path, capsys):
    calls = calls_file(tmp_path, [{"tool": T2I, "arguments": {"prompt": "fox", "n": 2}},
                                  {"tool": "tool_prompt_refine", "arguments": {"prompt": "fox"}}])
    assert run("cache", "build", tmp_path / "cache", calls, "--callable", "cache_fixtures:local_generator",
               "--quiet") == 0
    assert "recorded 2" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="package.module:name"):
        run("cache", "build", tmp_path / "cache", calls, "--callable", "cache_fixtures")


def test_fidelity_command(imported, tmp_path, capsys):
    media = tmp_path / "media"
    for i in range(2):
        write_png(media, f"m{i}.png", 100 + i, size=(1328, 1328))
    assert run("cache", "fidelity", imported, tmp_path / "mine" / "calls.jsonl", "--media", media,
               "--threshold", "0.95", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    # the "held-out" calls are the cached ones here, so the cache tiers return the very files
    assert report["tiers"]["exact_cache"]["c_tool"] == report["tiers"]["nearest"]["c_tool"] == 1.0
    assert report["tiers"]["attribute"]["served"] == 3


def damage_blob(cache, how):
    path = next(ToolCache(cache).entries()).outputs[0].path
    raw = bytearray(open(path, "rb").read())
    if how == "truncated blob":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def corrupt_attributes_row(cache, how):
    with sqlite3.connect(cache / "index.sqlite") as conn:
        conn.execute("UPDATE outputs SET attributes = '{\"width\": ' WHERE entry_id = 1")
    conn.close()


def flip_index_pages(cache, how):
    with sqlite3.connect(cache / "index.sqlite") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    path = cache / "index.sqlite"
    raw = bytearray(path.read_bytes())
    last = len(raw) - 4096  # the last page: a b-tree page that opening the index does not read
    raw[last: last + 16] = bytes(b ^ 0xFF for b in raw[last: last + 16])
    path.write_bytes(bytes(raw))


def empty_index(cache, how):
    for suffix in ("-wal", "-shm"):
        (cache / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (cache / "index.sqlite").write_bytes(b"")


@pytest.mark.parametrize("how, damage, stream, message", [
    ("truncated blob", damage_blob, "out", "0 missing, 1 corrupt, 1 entries quarantined"),
    ("flipped blob", damage_blob, "out", "0 missing, 1 corrupt, 1 entries quarantined"),
    ("corrupt attributes row", corrupt_attributes_row, "out", "1 entries quarantined (1 for corrupt rows)"),
    ("flipped index pages", flip_index_pages, "err", "damaged (SQLite integrity check)"),
    ("0-byte index", empty_index, "err", "index.sqlite is empty (0 bytes)"),
])
def test_verify_finds_every_kind_of_damage(imported, capsys, how, damage, stream, message):
    damage(imported, how)
    assert run("cache", "verify", imported, "--quiet") == 1
    captured = capsys.readouterr()
    assert message in getattr(captured, stream)
    if stream == "err":  # the index itself: verify says how to recover it
        assert "Restore" in captured.err and ".dump" in captured.err
    else:  # entries: quarantined, and the cache is sound again
        assert run("cache", "verify", imported, "--quiet") == 0
        assert len(ToolCache(imported)) == 2


def test_stats_show_damaged_entries_found_by_lookups(imported, capsys):
    damage_blob(imported, "flipped blob")
    entry = next(ToolCache(imported).entries())
    assert ExactCacheBackend(imported).answer(request(T2I, {"prompt": entry.arguments["prompt"]}, seed=1)) is None
    assert run("cache", "stats", imported) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(T2I))
    assert row.split()[1:] == ["2", "0", "0.0%", "0", "-", "1"]  # 2 entries left, 1 damaged


def test_commands_on_a_damaged_index_print_one_clear_error(imported, capsys):
    from visenv.cli import main

    empty_index(imported, "0-byte index")
    for command in ("stats", "export"):
        argv = ["cache", command, str(imported)] + ([str(imported.parent / "out")] if command == "export" else [])
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "index.sqlite is empty (0 bytes)" in err and f"Run `visenv cache verify {imported}`" in err
        assert "Traceback" not in err
