"""Record a VisGen episode through [exact_cache, real], replay it from the cache alone, exactly.

Also: training with [exact_cache, nearest, attribute] serves neighbours and falls back to the
simulation, and the observation says when an output is a neighbour.
"""

import io
import json
import logging
import os
import sqlite3

import numpy as np
import pytest
from PIL import Image

from visenv.envs.visgen import VisGenEnv
from visenv.error import BackendMiss, CacheCorruptError
from visenv.protocol import parse_tool_response
from visenv.tasks import make_suite
from visenv.tools.attribute import AttributeBackend
from visenv.tools.backends import BackendChain
from visenv.tools.cache import ExactCacheBackend, ToolCache
from visenv.tools.fidelity import TierCounter
from visenv.tools.nearest import MiniLMEmbedder, NearestBackend
from visenv.tools.real import GeneratedMedia, Generation, RealBackend


def unrepeatable_generator(request):
    """A 'real tool' that never gives the same output twice: replay must come from the cache."""
    spec = request.spec
    if spec.output.kind == "text":
        return Generation(text=f"{spec.name} says {os.urandom(6).hex()}")
    if spec.group == "image_edit":
        source = request.inputs["image"][0].attributes
        size = (source["width"], source["height"])
    else:
        size = spec.output.resolutions[request.arguments.get("aspect_ratio", "1:1")]
    media = []
    for _ in range(request.arguments.get("n", 1)):
        colour = np.frombuffer(os.urandom(3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(np.broadcast_to(colour, (size[1], size[0], 3)).copy()).save(buffer, format="PNG")
        media.append(GeneratedMedia(buffer.getvalue(), ".png"))
    return Generation(media=tuple(media))


def scripted_turns(observation):
    """A fixed little workflow: refine, generate two images, edit the second, answer."""
    yield ("<think>A fox picture is wanted.</think><plan>1. tool_prompt_refine\n2. tool_text2image_qwen\n"
           "3. tool_image_edit_qwen\n4. answer</plan>"
           '<tool_call>{"name": "tool_prompt_refine", "arguments": {"prompt": "a red fox"}}</tool_call>')
    yield ('<tool_call>{"name": "tool_text2image_qwen", "arguments": '
           '{"prompt": "a red fox in the snow", "n": 2}}</tool_call>')
    image = observation()["artifacts"][-1]
    yield ('<tool_call>{"name": "tool_image_edit_qwen", "arguments": '
           f'{{"image": "{image}", "prompt": "make it night"}}}}</tool_call>')
    yield f"<answer>Here is the picture: {observation()['artifacts'][-1]}</answer>"


def play(env, seed, task):
    obs, info = env.reset(seed=seed, options={"task": task})
    steps = [(obs, info)]
    for action in scripted_turns(lambda: steps[-1][0]):
        obs, reward, terminated, truncated, info = env.step(action)
        steps.append((obs, info | {"reward": reward, "terminated": terminated, "truncated": truncated}))
        if terminated or truncated:
            break
    return steps


def comparable(steps):
    """The episode as JSON, with what differs by design masked: the serving tier's name, and the GPU-seconds
    avoided (a replay avoids what the recording paid)."""
    def masked(info):
        cost = {k: v for k, v in info.get("cost", {}).items() if "avoided" not in k}
        return {**info, "cost": cost} if "cost" in info else info
    text = json.dumps([[{k: v for k, v in obs.items() if k != "pixels"}, masked(info)] for obs, info in steps],
                      sort_keys=True, default=str)
    return text.replace('\\"backend\\": \\"exact_cache\\"', '\\"backend\\": \\"real\\"').replace(
        '"backend": "exact_cache"', '"backend": "real"')


@pytest.fixture(scope="module")
def task():
    return make_suite(1, 0, modality="image")[0]


def test_a_recorded_episode_replays_exactly_from_a_strict_cache(tmp_path, task):
    cache = ToolCache(tmp_path / "cache")
    record = VisGenEnv(tasks=[task], backends={"*": [ExactCacheBackend(cache), RealBackend(unrepeatable_generator,
                                                                                          cache=cache)]})
    recorded = play(record, 11, task)
    calls = [info["tool_result"] for _, info in recorded[1:] if "tool_result" in info]
    assert [c["backend"] for c in calls] == ["real"] * 3 and all(c["status"] == "ok" for c in calls)
    assert recorded[-1][1]["terminated"]
    assert len(cache) == 3

    replay = VisGenEnv(tasks=[task], backends={"*": BackendChain([ExactCacheBackend(cache)], strict=True)})
    replayed = play(replay, 11, task)
    assert [info["tool_result"]["backend"] for _, info in replayed[1:] if "tool_result" in info] == ["exact_cache"] * 3
    assert comparable(replayed) == comparable(recorded)
    assert [obs for obs, _ in replayed] == [obs for obs, _ in recorded]  # what the agent sees: identical
    assert comparable(play(replay, 11, task)) == comparable(recorded)  # and again

    rerecord = play(record, 11, task)  # the record chain now hits its own cache
    assert comparable(rerecord) == comparable(recorded)

    with pytest.raises(BackendMiss, match="strict chain"):
        play(replay, 12, task)  # another seed: calls the cache never saw


def test_training_chain_serves_neighbours_and_falls_back_to_simulation(tmp_path, task, media_db):
    cache = ToolCache(tmp_path / "cache")
    play(VisGenEnv(tasks=[task], backends={"*": [RealBackend(unrepeatable_generator, cache=cache)]}), 5, task)
    # the cache now holds "a red fox in the snow" (n=2) among the episode's calls
    chain = [ExactCacheBackend(cache), NearestBackend(cache, threshold=0.7, embedder=MiniLMEmbedder()),
             AttributeBackend(media_db)]
    env = VisGenEnv(tasks=[task], backends={"*": chain})
    obs, _ = env.reset(seed=99, options={"task": task})
    obs, _, _, _, info = env.step(
        "<think>fox</think><plan>1. tool_text2image_qwen\n2. answer</plan>"
        '<tool_call>{"name": "tool_text2image_qwen", "arguments": {"prompt": "a red fox standing in snow", '
        '"n": 2}}</tool_call>')
    response = parse_tool_response(obs["text"])
    assert info["tool_result"]["backend"] == "nearest" and response["backend"] == "nearest"
    assert 0.7 <= response["similarity"] < 1.0 and "most similar" in response["note"]
    obs, _, _, _, info = env.step('<tool_call>{"name": "tool_text2image_qwen", "arguments": '
                                  '{"prompt": "a spreadsheet of tax figures", "n": 2}}</tool_call>')
    assert info["tool_result"]["backend"] == "attribute"
    counter = TierCounter()
    counter.add_episode(env.record)
    summary = counter.summary()
    assert summary["tiers"]["nearest"]["calls"] == 1 and summary["tiers"]["attribute"]["calls"] == 1
    assert summary["gpu_seconds_avoided"] == pytest.approx(2 * 2 * 9.0)


def test_a_damaged_cache_never_serves_nor_raises_out_of_step_and_a_damaged_index_is_one_clear_error(
        tmp_path, task, media_db):
    cache = ToolCache(tmp_path / "cache")
    play(VisGenEnv(tasks=[task], backends={"*": [RealBackend(unrepeatable_generator, cache=cache)]}), 5, task)
    [pictures] = [e for e in cache.entries() if e.tool == "tool_text2image_qwen"]
    first, second = (out.path for out in pictures.outputs)
    os.truncate(first, os.path.getsize(first) // 2)
    raw = bytearray(open(second, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(second, "wb").write(bytes(raw))
    env = VisGenEnv(tasks=[task], backends={"*": [ExactCacheBackend(cache), AttributeBackend(media_db)]})
    steps = play(env, 5, task)
    served = [info["tool_result"]["backend"] for _, info in steps[1:] if "tool_result" in info]
    assert served == ["exact_cache", "attribute", "attribute"]  # the damaged pictures: a miss, the next tier
    assert steps[-1][1]["terminated"] and cache.counters()["tool_text2image_qwen"]["corrupt_file"] == 1
    with pytest.raises(BackendMiss, match="strict chain"):  # replay never serves the damaged entry
        play(VisGenEnv(tasks=[task], backends={"*": BackendChain([ExactCacheBackend(cache)], strict=True)}), 5, task)

    [refine] = [e for e in cache.entries() if e.tool == "tool_prompt_refine"]
    with sqlite3.connect(cache.index_path) as conn:
        conn.execute("UPDATE entries SET arguments = '{\"prompt\": ' WHERE id = ?", (refine.id,))
    conn.close()
    with pytest.raises(CacheCorruptError, match=f"entry .* is corrupt.*visenv cache verify {cache.root}"):
        play(env, 5, task)  # the first use names the fix
    assert ToolCache(cache.root).verify().bad_rows == (refine.id,)
    assert play(env, 5, task)[-1][1]["terminated"]

    cache.close()
    for suffix in ("-wal", "-shm"):
        (cache.root / f"index.sqlite{suffix}").unlink(missing_ok=True)
    cache.index_path.write_bytes(b"")
    with pytest.raises(CacheCorruptError, match="0 bytes.*visenv cache verify"):  # at env construction
        VisGenEnv(tasks=[task], backends={"*": [ExactCacheBackend(cache.root), AttributeBackend(media_db)]})


@pytest.mark.parametrize("damage", ["garbage manifest", "truncated vectors"])
def test_env_step_with_a_damaged_saved_nearest_index_rebuilds_it_and_serves(tmp_path, task, media_db, damage, caplog):
    cache = ToolCache(tmp_path / "cache")
    play(VisGenEnv(tasks=[task], backends={"*": [RealBackend(unrepeatable_generator, cache=cache)]}), 5, task)
    embedder = MiniLMEmbedder()
    NearestBackend(cache, embedder=embedder).refresh()  # saves the index next to the cache
    folder = cache.root / "nearest" / embedder.name
    if damage == "garbage manifest":
        (folder / "manifest.json").write_bytes(b"\xff\xfe not json" * 20)
    else:
        vectors = max(folder.glob("*.npy"), key=lambda p: p.stat().st_size)
        os.truncate(vectors, vectors.stat().st_size // 2)
    chain = [ExactCacheBackend(cache), NearestBackend(cache, threshold=0.7, embedder=embedder),
             AttributeBackend(media_db)]
    env = VisGenEnv(tasks=[task], backends={"*": chain})
    env.reset(seed=99, options={"task": task})
    with caplog.at_level(logging.WARNING, logger="visenv.tools.nearest"):
        _, _, _, _, info = env.step('<tool_call>{"name": "tool_text2image_qwen", "arguments": '
                                    '{"prompt": "a red fox standing in snow", "n": 2}}</tool_call>')
    assert info["tool_result"]["backend"] == "nearest" and "rebuilt from the cache" in caplog.text
