"""The tool cache store and the exact-cache backend: round trips, first-writer-wins, verify, stats, io."""

import collections
import dataclasses
import gc
import json
import logging
import os
import pickle
import shutil
import sqlite3
import time

import pytest

from cache_fixtures import image_artifact, image_output, png_bytes, request, write_png
from visenv.error import BackendError, BackendMiss, CacheCorruptError, CacheFormatError, CacheSchemaError
from visenv.media import sha256_file
from visenv.tools.backends import BackendAnswer, BackendChain, ToolFailure
from visenv.tools.cache import ExactCacheBackend, ToolCache
from visenv.tools.cache_io import export_cache, import_calls, read_calls
from visenv.tools.cache_key import CallKey
from visenv.tools.specs import get_tool

T2I = get_tool("tool_text2image_qwen")


@pytest.fixture
def cache(tmp_path):
    return ToolCache(tmp_path / "cache")


def put_image(cache, folder, prompt, seed, image_seed, **arguments):
    path = write_png(folder, f"{prompt.replace(' ', '_')}-{seed}-{image_seed}.png", image_seed)
    key = CallKey.of(T2I, {"prompt": prompt, **arguments}, seed=seed)
    return cache.put(T2I, key, [image_output(path, prompt)])


def test_put_then_get_round_trips(cache, tmp_path):
    entry = put_image(cache, tmp_path, "a red fox", seed=3, image_seed=1)
    assert (entry.tool, entry.seed, entry.source, entry.prompt) == (T2I.name, 3, "real", "a red fox")
    assert entry.arguments == {"prompt": "a red fox", "n": 1, "aspect_ratio": "1:1"}
    [out] = entry.outputs
    assert out.path.startswith(str(cache.root / "blobs")) and os.path.exists(out.path)
    assert out.attributes == {"width": 24, "height": 16}
    again = ToolCache(cache.root).get(CallKey.of(T2I, {"prompt": "a  red fox "}, seed=3))
    assert again == entry
    assert cache.get(CallKey.of(T2I, {"prompt": "a red fox"}, seed=4)) is None
    assert len(cache) == 1


def test_a_cache_at_a_relative_path_opens_and_serves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = put_image(ToolCache("runs/cache"), tmp_path, "fox", seed=1, image_seed=1)
    assert ExactCacheBackend("runs/cache").answer(request(T2I.name, {"prompt": "fox"}, seed=1)).outputs[0].sha256 == \
        entry.outputs[0].sha256


def test_first_writer_wins_and_the_loser_gets_the_winner(cache, tmp_path):
    first = put_image(cache, tmp_path, "fox", seed=1, image_seed=1)
    second = put_image(cache, tmp_path, "fox", seed=1, image_seed=2)
    assert second == first
    assert len(cache) == 1
    report = cache.verify()
    assert report.ok and report.orphans == 1  # the loser's file, never referenced


def test_put_refuses_a_wrong_hash_and_stateful_tools(cache, tmp_path):
    path = write_png(tmp_path, "x.png", 1)
    lying = dataclasses.replace(image_output(path), sha256="0" * 64)
    with pytest.raises(BackendError, match="hashes to"):
        cache.put(T2I, CallKey.of(T2I, {"prompt": "x"}, seed=0), [lying])
    todo = get_tool("tool_task_manager")
    with pytest.raises(ValueError, match="cannot be cached"):
        cache.put(todo, CallKey.of(todo, {"action": "list"}, seed=0), [], text="nothing")
    assert len(cache) == 0


def test_exact_backend_hits_misses_and_seedless_entries(cache, tmp_path):
    stored = put_image(cache, tmp_path, "a red fox", seed=7, image_seed=1)
    backend = ExactCacheBackend(cache)
    answer = backend.answer(request(T2I.name, {"prompt": "a red fox", "n": 1}, seed=7))
    assert answer.backend == "exact_cache" and answer.similarity is None
    assert [o.sha256 for o in answer.outputs] == [o.sha256 for o in stored.outputs]
    assert backend.answer(request(T2I.name, {"prompt": "a red fox"}, seed=8)) is None
    seedless = put_image(cache, tmp_path, "a blue owl", seed=None, image_seed=2)
    for seed in (0, 1, 99):
        assert backend.answer(request(T2I.name, {"prompt": "a blue owl"}, seed=seed)).outputs[0].sha256 == \
            seedless.outputs[0].sha256
    assert ExactCacheBackend(cache, any_seed=False).answer(request(T2I.name, {"prompt": "a blue owl"}, seed=0)) is None


def test_exact_backend_passes_on_stateful_tools_and_missing_files(cache, tmp_path):
    backend = ExactCacheBackend(cache)
    assert backend.answer(request("tool_task_manager", {"action": "list"})) is None
    entry = put_image(cache, tmp_path, "fox", seed=1, image_seed=1)
    os.remove(entry.outputs[0].path)
    assert backend.answer(request(T2I.name, {"prompt": "fox"}, seed=1)) is None
    assert cache.counters()[T2I.name]["missing_file"] == 1


def test_strict_chain_miss_raises_and_lenient_chain_tells_the_agent(cache):
    req = request(T2I.name, {"prompt": "never seen"}, seed=1)
    with pytest.raises(BackendMiss, match="strict chain.*exact_cache.*tool_text2image_qwen"):
        BackendChain([ExactCacheBackend(cache)], strict=True).answer(req)
    failure = BackendChain([ExactCacheBackend(cache)]).answer(req)
    assert isinstance(failure, ToolFailure) and "unavailable" in failure.message


def test_stats_count_entries_size_and_hit_rates(cache, tmp_path):
    entry = put_image(cache, tmp_path, "fox", seed=1, image_seed=1)
    backend = ExactCacheBackend(cache)
    for seed in (1, 1, 1, 2):
        backend.answer(request(T2I.name, {"prompt": "fox"}, seed=seed))
    cache.flush()
    stats = ToolCache(cache.root).stats()  # another handle: the counts were written
    assert stats["entries"] == 1 and stats["blobs"] == 1
    assert stats["bytes"] == os.path.getsize(entry.outputs[0].path)
    row = stats["tools"][T2I.name]
    assert (row["entries"], row["exact_hit"], row["exact_miss"], row["exact_hit_rate"]) == (1, 3, 1, 0.75)
    assert row["nearest_hit_rate"] is None


def test_counts_are_flushed_when_the_cache_is_collected(tmp_path):
    root = tmp_path / "cache"
    cache = ToolCache(root)
    cache.count(T2I.name, "exact_hit", 5)
    del cache
    gc.collect()
    assert ToolCache(root).counters()[T2I.name]["exact_hit"] == 5


def test_verify_quarantines_corrupt_and_missing_files(cache, tmp_path):
    good = put_image(cache, tmp_path, "good", seed=1, image_seed=1)
    corrupt = put_image(cache, tmp_path, "corrupt", seed=1, image_seed=2)
    missing = put_image(cache, tmp_path, "missing", seed=1, image_seed=3)
    with open(corrupt.outputs[0].path, "r+b") as fh:
        fh.seek(30)
        fh.write(b"\x00\x01\x02")
    os.remove(missing.outputs[0].path)
    stale = cache.blobs.root / "ab" / ".tmp-interrupted"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    report = cache.verify()
    assert not report.ok
    assert report.corrupt == (corrupt.outputs[0].sha256,) and report.missing == (missing.outputs[0].sha256,)
    assert report.quarantined_entries == 2 and report.temporary_removed == 1 and not stale.exists()
    assert cache.get(corrupt.key) is None and cache.get(missing.key) is None and cache.get(good.key) == good
    assert (cache.root / "quarantine" / os.path.basename(corrupt.outputs[0].path)).exists()
    rows = sqlite3.connect(cache.index_path).execute("SELECT tool, reason, record FROM quarantine").fetchall()
    assert sorted(r[1].split()[0] for r in rows) == ["corrupt", "missing"]
    assert json.loads(rows[0][2])["arguments"]["prompt"] in ("corrupt", "missing")
    assert cache.verify().ok
    again = put_image(cache, tmp_path, "corrupt", seed=1, image_seed=4)  # the call can be recorded afresh
    assert again.id > missing.id


def test_verify_without_hashes_still_catches_size_changes(cache, tmp_path):
    entry = put_image(cache, tmp_path, "fox", seed=1, image_seed=1)
    with open(entry.outputs[0].path, "ab") as fh:
        fh.write(b"trailing")
    assert cache.verify(check_hashes=False).corrupt == (entry.outputs[0].sha256,)


def test_cache_and_backend_pickle_and_reopen(cache, tmp_path):
    put_image(cache, tmp_path, "fox", seed=1, image_seed=1)
    backend = pickle.loads(pickle.dumps(ExactCacheBackend(cache)))
    assert backend.answer(request(T2I.name, {"prompt": "fox"}, seed=1)).backend == "exact_cache"


def test_a_cache_from_another_schema_version_is_refused(cache):
    conn = sqlite3.connect(cache.index_path)
    conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")
    conn.commit()
    conn.close()
    with pytest.raises(CacheSchemaError, match="schema version 99"):
        ToolCache(cache.root)


def write_calls(folder, lines):
    path = folder / "calls.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_import_export_round_trip(cache, tmp_path):
    src = tmp_path / "mine"
    write_png(src, "images/fox.png", 1, size=(32, 32))
    write_png(src, "images/fox_night.png", 2, size=(32, 32))
    write_png(src, "images/owl_a.png", 3)
    write_png(src, "images/owl_b.png", 4)
    calls = write_calls(src, [
        {"tool": T2I.name, "arguments": {"prompt": "a red fox"}, "file": "images/fox.png", "seed": 7},
        {"tool": "tool_image_edit_qwen", "arguments": {"image": "images/fox.png", "prompt": "night"},
         "file": ["images/fox_night.png"]},
        {"tool": T2I.name, "arguments": {"prompt": "owls", "n": 2}, "file": ["images/owl_a.png", "images/owl_b.png"],
         "attributes": [{"style_tag": "a"}, {"style_tag": "b"}]},
        {"tool": "tool_prompt_refine", "arguments": {"prompt": "a fox"}, "text": "A red fox at dawn."},
    ])
    assert import_calls(cache, calls, progress=False) == (4, 0)
    assert import_calls(cache, calls, progress=False) == (0, 4)
    backend = ExactCacheBackend(cache)
    assert backend.answer(request(T2I.name, {"prompt": "a red fox"}, seed=7)) is not None
    fox = image_artifact(src / "images/fox.png", "img_0123456789ab")
    edit = backend.answer(request("tool_image_edit_qwen", {"image": fox.id, "prompt": "night"}, seed=123,
                                  inputs={"image": (fox,)}))
    assert edit.outputs[0].attributes == {"width": 32, "height": 32}
    owls = backend.answer(request(T2I.name, {"prompt": "owls", "n": 2}, seed=5))
    assert [o.attributes["style_tag"] for o in owls.outputs] == ["a", "b"]
    assert backend.answer(request("tool_prompt_refine", {"prompt": "a fox"}, seed=1)).text == "A red fox at dawn."

    assert export_cache(cache, tmp_path / "out", progress=False) == 4
    copy = ToolCache(tmp_path / "copy")
    assert import_calls(copy, tmp_path / "out" / "calls.jsonl", progress=False) == (4, 0)
    original = {e.key: (e.text, [o.sha256 for o in e.outputs], [dict(o.attributes) for o in e.outputs])
                for e in cache.entries()}
    assert {e.key: (e.text, [o.sha256 for o in e.outputs], [dict(o.attributes) for o in e.outputs])
            for e in copy.entries()} == original
    assert export_cache(cache, tmp_path / "only_edit", tool="tool_image_edit_qwen", progress=False) == 1


@pytest.mark.parametrize("line, message", [
    ({"tool": "tool_text2image_qwn", "arguments": {"prompt": "x"}, "file": "a.png"}, "Did you mean tool_text2image_qwen"),
    ({"tool": T2I.name, "arguments": {"prompt": "x", "n": 9}, "file": "a.png"}, "invalid arguments"),
    ({"tool": T2I.name, "arguments": {"prompt": "x"}}, "give its 'file'"),
    ({"tool": T2I.name, "arguments": {"prompt": "x"}, "file": "nope.png"}, "does not exist"),
    ({"tool": "tool_text2video_veo", "arguments": {"prompt": "x"}, "file": "a.png"}, "is not a video file"),
    ({"tool": "tool_prompt_refine", "arguments": {"prompt": "x"}, "file": "a.png"}, "answers with text"),
    ({"tool": "tool_image_edit_qwen", "arguments": {"image": "gone.png", "prompt": "x"}, "file": "a.png"},
     "neither a file"),
    ({"tool": T2I.name, "arguments": {"prompt": "x"}, "file": "a.png", "seed": "7"}, "'seed' must be"),
])
def test_bad_calls_lines_name_the_file_and_line(tmp_path, line, message):
    write_png(tmp_path, "a.png", 1)
    path = write_calls(tmp_path, [{"tool": T2I.name, "arguments": {"prompt": "fine"}, "file": "a.png"}, line])
    with pytest.raises(CacheFormatError, match=rf"calls.jsonl:2: .*{message}"):
        read_calls(path)


def test_read_calls_resolves_hash_references_from_the_cache(cache, tmp_path):
    entry = put_image(cache, tmp_path, "fox", seed=1, image_seed=1)
    ref = "sha256:" + entry.outputs[0].sha256
    path = write_calls(tmp_path, [{"tool": "tool_image_edit_qwen", "arguments": {"image": ref, "prompt": "x"}}])
    [with_cache] = read_calls(path, cache=cache, outputs=False)
    assert with_cache.inputs["image"][0].path == entry.outputs[0].path
    [without] = read_calls(path, outputs=False)
    assert without.inputs == {} and without.arguments["image"] == ref
    assert with_cache.key() == without.key()


# ---- integrity: damaged files, rows and indexes ----------------------------------------------

def damage_file(path, how):
    """Damage a real file on disk: cut it in half, flip a byte (keeping its size), or delete it."""
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "flip":
        raw = bytearray(open(path, "rb").read())
        raw[len(raw) // 2] ^= 0xFF
        open(path, "wb").write(bytes(raw))
    else:
        os.remove(path)
    if how != "delete":
        os.utime(path, ns=(1, 1))  # a later write: the file's signature differs from the one checked


class Fallback:
    """The next backend in a chain: answers every call, so a cache miss shows as its name."""

    name = "fallback"

    def answer(self, request):
        return BackendAnswer(outputs=(), text="from the next backend", backend=self.name)


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_a_damaged_blob_is_a_counted_logged_quarantined_miss(cache, tmp_path, how, caplog):
    good = put_image(cache, tmp_path, "good", seed=1, image_seed=1)
    entry = put_image(cache, tmp_path, "fox", seed=1, image_seed=2)
    chain = BackendChain([ExactCacheBackend(cache), Fallback()])
    fox = request(T2I.name, {"prompt": "fox"}, seed=1)
    assert chain.answer(fox).backend == "exact_cache"  # served once: its hash is checked and remembered
    blob = entry.outputs[0].path
    damage_file(blob, how)
    with caplog.at_level(logging.WARNING, logger="visenv.tools.cache"):
        assert chain.answer(fox).backend == "fallback"
    kind = "missing" if how == "delete" else "corrupt"
    assert f"entry {entry.id} ({T2I.name}) not served" in caplog.text
    assert cache.counters()[T2I.name][f"{kind}_file"] == 1 and cache.counters()[T2I.name]["exact_miss"] == 1
    assert cache.get(entry.key) is None and cache.get(good.key) == good  # quarantined: the call can be recorded afresh
    moved = cache.root / "quarantine" / os.path.basename(blob)
    assert moved.exists() == (how != "delete") and not os.path.exists(blob)
    [(reason, record)] = sqlite3.connect(cache.index_path).execute("SELECT reason, record FROM quarantine").fetchall()
    assert reason.startswith(f"{kind} file: ") and json.loads(record)["arguments"]["prompt"] == "fox"
    assert cache.verify().ok
    assert chain.answer(request(T2I.name, {"prompt": "good"}, seed=1)).backend == "exact_cache"


def test_a_damaged_blob_that_cannot_be_quarantined_is_still_a_logged_miss(cache, tmp_path, monkeypatch, caplog):
    entry = put_image(cache, tmp_path, "fox", seed=1, image_seed=2)
    damage_file(entry.outputs[0].path, "truncate")

    def read_only(*args):
        raise PermissionError(13, "Read-only file system")
    monkeypatch.setattr(ToolCache, "_quarantine_file", read_only)
    with caplog.at_level(logging.WARNING, logger="visenv.tools.cache"):
        assert ExactCacheBackend(cache).answer(request(T2I.name, {"prompt": "fox"}, seed=1)) is None
    assert "quarantining it failed" in caplog.text and "Read-only" in caplog.text
    assert cache.get(entry.key) == entry  # still indexed, never served


def test_a_flipped_byte_is_caught_on_a_process_first_serve_even_with_its_mtime_kept(cache, tmp_path):
    entry = put_image(cache, tmp_path, "fox", seed=1, image_seed=2)
    blob = entry.outputs[0].path
    stat = os.stat(blob)
    raw = bytearray(open(blob, "rb").read())
    raw[40] ^= 0x01
    open(blob, "wb").write(bytes(raw))
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # silent damage: same size, same mtime
    fresh = ExactCacheBackend(ToolCache(cache.root))  # what another process sees
    assert fresh.answer(request(T2I.name, {"prompt": "fox"}, seed=1)) is None
    assert fresh.cache.counters()[T2I.name]["corrupt_file"] == 1


def test_storing_identical_content_repairs_a_damaged_blob(cache, tmp_path):
    entry = put_image(cache, tmp_path, "fox", seed=1, image_seed=2)
    blob = entry.outputs[0].path
    damage_file(blob, "flip")
    again = put_image(cache, tmp_path, "another call, the same picture", seed=1, image_seed=2)
    assert again.outputs[0].path == blob and sha256_file(blob) == entry.outputs[0].sha256
    assert (cache.root / "quarantine" / os.path.basename(blob)).exists()  # the damaged copy, kept aside
    assert ExactCacheBackend(cache).answer(request(T2I.name, {"prompt": "fox"}, seed=1)).outputs[0].path == blob
    damage_file(blob, "truncate")
    sha, path = cache.blobs.put_bytes(png_bytes(2), ".png")  # how a real backend stores what it generated
    assert str(path) == blob and sha256_file(path) == sha == entry.outputs[0].sha256
    assert cache.verify().ok


def test_reimporting_repairs_damaged_entries(cache, tmp_path):
    src = tmp_path / "mine"
    for i in range(3):
        write_png(src, f"{i}.png", i)
    calls = write_calls(src, [{"tool": T2I.name, "arguments": {"prompt": f"p{i}"}, "file": f"{i}.png"}
                              for i in range(3)])
    assert import_calls(cache, calls, progress=False) == (3, 0)
    entries = list(cache.entries())
    damage_file(entries[0].outputs[0].path, "flip")
    damage_file(entries[1].outputs[0].path, "delete")
    assert import_calls(cache, calls, progress=False) == (2, 1)
    backend = ExactCacheBackend(cache)
    for i in range(3):
        served = backend.answer(request(T2I.name, {"prompt": f"p{i}"}, seed=5))
        assert sha256_file(served.outputs[0].path) == served.outputs[0].sha256
    assert cache.verify().ok


CORRUPT_ROWS = {
    "attributes JSON": "UPDATE outputs SET attributes = '{\"width\": 24, \"hei' WHERE entry_id = ?",
    "attributes not an object": "UPDATE outputs SET attributes = '[24, 16]' WHERE entry_id = ?",
    "arguments JSON": "UPDATE entries SET arguments = '{\"prompt\"' WHERE id = ?",
    "text not UTF-8": "UPDATE entries SET text = CAST(x'66ff6f78' AS TEXT) WHERE id = ?",
    "blob row gone": "DELETE FROM blobs WHERE sha256 = (SELECT sha256 FROM outputs WHERE entry_id = ?)",
}


@pytest.mark.parametrize("how", CORRUPT_ROWS)
def test_a_corrupt_row_is_one_clear_error_until_verify_quarantines_it(cache, tmp_path, how):
    good = put_image(cache, tmp_path, "good", seed=1, image_seed=1)
    bad = put_image(cache, tmp_path, "fox", seed=1, image_seed=2)
    with sqlite3.connect(cache.index_path) as conn:
        conn.execute(CORRUPT_ROWS[how], (bad.id,))
    conn.close()
    backend = ExactCacheBackend(cache)
    with pytest.raises(CacheCorruptError, match=r"entry .* is corrupt.*`visenv cache verify "):
        backend.answer(request(T2I.name, {"prompt": "fox"}, seed=1))
    error = pytest.raises(CacheCorruptError, cache.get, bad.key).value
    assert pickle.loads(pickle.dumps(error)).args == error.args  # crosses Ray intact
    report = cache.verify()
    assert not report.ok and report.bad_rows == (bad.id,) and report.quarantined_entries == 1
    assert backend.answer(request(T2I.name, {"prompt": "fox"}, seed=1)) is None
    assert backend.answer(request(T2I.name, {"prompt": "good"}, seed=1)).outputs[0].sha256 == good.outputs[0].sha256
    assert cache.verify().ok


@pytest.mark.parametrize("content", [b"", b"not a database at all " * 300], ids=["zero-bytes", "garbage"])
def test_an_empty_or_garbage_index_is_refused_not_taken_as_empty(cache, tmp_path, content):
    put_image(cache, tmp_path, "fox", seed=1, image_seed=2)
    cache.close()
    for suffix in ("-wal", "-shm"):
        (cache.root / f"index.sqlite{suffix}").unlink(missing_ok=True)
    cache.index_path.write_bytes(content)
    with pytest.raises(CacheCorruptError, match=r"index.sqlite.*(0 bytes|not a database).*`visenv cache verify"):
        ToolCache(cache.root)
    assert cache.index_path.read_bytes() == content  # refused, left as found


def test_a_lost_index_beside_stored_files_is_refused(cache, tmp_path):
    put_image(cache, tmp_path, "fox", seed=1, image_seed=2)
    cache.close()
    for suffix in ("", "-wal", "-shm"):
        (cache.root / f"index.sqlite{suffix}").unlink(missing_ok=True)
    with pytest.raises(CacheCorruptError, match="index.sqlite is missing, but blobs/ holds files"):
        ToolCache(cache.root)


def flip_page(index_path, page, offset, page_size=4096):
    raw = bytearray(open(index_path, "rb").read())
    for i in range(16):
        raw[page * page_size + offset + i] ^= 0xFF
    open(index_path, "wb").write(bytes(raw))


def test_flipped_index_pages_give_one_clear_error_and_verify_finds_them(tmp_path):
    """Flip 16 bytes at three places of every page: SQLite's own errors never escape, verify finds every damage."""
    seed = ToolCache(tmp_path / "seed")
    calls = [request(T2I.name, {"prompt": f"prompt number {i}"}, seed=i) for i in range(30)]
    for i, call in enumerate(calls):
        put_image(seed, tmp_path, call.arguments["prompt"], seed=i, image_seed=i)
    seed.close()
    with sqlite3.connect(seed.index_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    pages = os.path.getsize(seed.index_path) // 4096
    outcomes = collections.Counter()
    for page in range(pages):
        for offset in (100 if page == 0 else 0, 8, 2000):
            root = tmp_path / f"flip-{page}-{offset}"
            shutil.copytree(seed.root, root)
            flip_page(root / "index.sqlite", page, offset)
            try:
                backend = ExactCacheBackend(root)
                served = sum(backend.answer(call) is not None for call in calls)
                len(backend.cache), backend.cache.stats()
            except CacheCorruptError as error:
                assert "`visenv cache verify" in str(error)
                served = None
            try:
                report = ToolCache(root).verify()
                found = not report.ok
            except CacheCorruptError:  # cannot even be opened: `visenv cache verify` says so (test_cache_cli)
                found = True
            assert found or served == len(calls), f"page {page}+{offset}: damage that verify does not report"
            outcomes["raised" if served is None else "served"] += 1
    assert outcomes["raised"] >= pages  # the test damaged indexes for real
