"""The semantic tier: rendered content from the call's ask, tool fidelity with defects, perception."""

import json
import wave

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from PIL import Image

from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError
from visenv.mediadb import probe
from visenv.protocol import format_turn
from visenv.scene import SUBJECT_ICONS, compare, describe, parse_description, parse_prompt, realise


def call(env, name, **arguments):
    _, _, _, _, info = env.step(format_turn(tool_call={"name": name, "arguments": arguments}))
    record = info["tool_result"]
    assert record["status"] == "ok", record["error"]
    return record, [env.registry.get(i) for i in record["outputs"]]


def fresh(**options):
    env = VisGenEnv(content="semantic", **options)
    env.reset(seed=0)
    return env


# ---- the parser ----------------------------------------------------------------------------------

def test_parser_reads_subjects_counts_colours_text_and_style():
    ask = parse_prompt('Three red foxes next to a blue car, a banner that says "SALE"', style="Watercolor")
    assert ask == {"subjects": [{"name": "fox", "count": 3, "colour": "red"},
                                {"name": "car", "count": 1, "colour": "blue"}],
                   "text": "SALE", "style": "watercolor"}
    assert parse_prompt("2 puppies and one gray kitten")["subjects"] == [
        {"name": "puppy", "count": 2, "colour": None}, {"name": "kitten", "count": 1, "colour": "grey"}]
    assert parse_prompt("a neon poster")["style"] == "neon"
    assert parse_prompt("nothing known here")["subjects"] == [{"name": "object", "count": 1, "colour": None}]


def test_the_vocabulary_knows_the_head_nouns_of_common_subjects():
    for noun in ("mug", "fox", "robot", "car", "tree", "house", "backpack", "moon", "astronaut"):
        assert noun in SUBJECT_ICONS
    assert len(set(SUBJECT_ICONS.values())) >= 10  # distinct icons


def test_describe_and_parse_description_round_trip():
    scene = realise(parse_prompt('two green cats and a "HELLO" sign'), {}, seed=3)
    parsed = parse_description(describe(scene))
    assert parsed["text"] == "HELLO"
    assert [(s["name"], s["count"], s["colour"], s["identity"]) for s in parsed["subjects"]] == \
        [(s["name"], s["count"], s["colour"], s["identity"]) for s in scene["subjects"]]
    assert compare(parse_prompt('two green cats and a "HELLO" sign'), scene) == []


# ---- rendering -----------------------------------------------------------------------------------

def test_an_image_shows_what_its_prompt_asked_and_is_deterministic():
    env = fresh()
    record, (image,) = call(env, "tool_text2image_seed", prompt='three red foxes, the words "WILD"')
    scene = image.content["scene"]
    assert [(s["name"], s["count"], s["colour"]) for s in scene["subjects"]] == [("fox", 3, "red")]
    assert scene["text"] == "WILD" and image.content["defects"] == [] and record["defects"] == []
    assert "content" not in json.dumps(image.describe())  # the truth is never shown to the agent
    with Image.open(image.path) as picture:
        assert max(picture.size) == 256
        pixels = np.asarray(picture.convert("RGB"))
    assert (np.abs(pixels.astype(int) - (220, 40, 40)).sum(axis=2) < 30).sum() > 500  # red foxes drawn
    again = fresh()
    _, (same,) = call(again, "tool_text2image_seed", prompt='three red foxes, the words "WILD"')
    assert same.sha256 == image.sha256


def test_two_counts_render_different_pixels():
    env = fresh()
    _, (one,) = call(env, "tool_text2image_seed", prompt="one blue car")
    _, (two,) = call(env, "tool_text2image_seed", prompt="two blue cars")
    runs = []
    for image in (one, two):  # runs of columns that hold blue: one per car side by side
        with Image.open(image.path) as picture:
            blue = (np.abs(np.asarray(picture.convert("RGB")).astype(int) - (40, 90, 220)).sum(axis=2) < 30).any(0)
        runs.append(int(blue[0]) + int(np.sum(blue[1:] & ~blue[:-1])))
    assert runs == [1, 2]


def test_reference_based_calls_keep_identity_and_plain_calls_drift():
    env = fresh()
    _, (anchor,) = call(env, "tool_text2image_seed", prompt="a robot in a garden")
    _, (other,) = call(env, "tool_text2image_seed", prompt="a robot in a garden")
    _, (kept,) = call(env, "tool_text2image_seed", prompt="a robot waving", reference_images=[anchor.id])
    _, (edited,) = call(env, "tool_image_edit_qwen", image=anchor.id, prompt="make it two robots")
    _, (clip,) = call(env, "tool_image2video_keling", image=anchor.id, prompt="slow pan")
    identity = anchor.content["scene"]["subjects"][0]["identity"]
    assert other.content["scene"]["subjects"][0]["identity"] != identity
    assert kept.content["scene"]["subjects"][0]["identity"] == identity
    assert edited.content["scene"]["subjects"][0] == {**anchor.content["scene"]["subjects"][0], "count": 2}
    assert clip.content["shots"][0]["scene"]["subjects"][0]["identity"] == identity


def test_video_shots_follow_the_clips_with_exact_durations_and_audio_is_exact():
    env = fresh()
    _, (a,) = call(env, "tool_text2video_veo", prompt="a red car", duration=4)
    _, (b,) = call(env, "tool_text2video_veo", prompt="two green trees", duration=6)
    _, (video,) = call(env, "tool_video_composite", clips=[a.id, b.id])
    shots = video.content["shots"]
    assert [s["duration"] for s in shots] == [4.0, 6.0] and video.attributes["duration"] == 10.0
    assert [s["scene"]["subjects"][0]["name"] for s in shots] == ["car", "tree"]
    assert probe(video.path, "video")["duration"] == pytest.approx(10.0, abs=0.11)
    _, (trimmed,) = call(env, "tool_video_trim_edit", video=video.id, start=3.0, end=5.5)
    assert [s["duration"] for s in trimmed.content["shots"]] == [1.0, 1.5]
    _, (music,) = call(env, "tool_music_suno", prompt="calm piano", duration=7.3)
    with wave.open(music.path) as track:
        assert track.getnframes() / track.getframerate() == pytest.approx(7.3, abs=1e-3)
    beats = env.step(format_turn(tool_call={"name": "tool_beat_detect", "arguments": {"audio": music.id}}))[4]
    assert f"Tempo: {music.content['tempo']} BPM" in beats["tool_result"]["text"]


def test_pixel_observations_show_the_rendered_content():
    env = VisGenEnv(content="semantic", observe_pixels=True, pixel_size=32)
    env.reset(seed=0)
    obs = env.step(format_turn(tool_call={"name": "tool_text2image_seed", "arguments": {"prompt": "a red fox"}}))[0]
    obs2 = env.step(format_turn(tool_call={"name": "tool_text2image_seed",
                                           "arguments": {"prompt": "four blue cars"}}))[0]
    assert obs["pixels_mask"][0] == 1 and not np.array_equal(obs["pixels"][0], obs2["pixels"][0])


# ---- fidelity ------------------------------------------------------------------------------------

def test_fidelity_zero_spoils_every_generation_and_lists_the_defect():
    env = fresh(tool_fidelity=0.0)
    kinds = set()
    for k in range(12):
        record, (image,) = call(env, "tool_text2image_seed", prompt=f'a red fox, the words "HELLO{k}"')
        assert len(record["defects"]) >= 1 and record["defects"][0]["artifact"] == image.id
        assert image.content["defects"] == [{k: v for k, v in d.items() if k != "artifact"} for d in record["defects"]]
        assert all(isinstance(v, str) for d in record["defects"] for v in d.values())
        kinds |= {d["kind"] for d in record["defects"]}
    assert kinds == {"wrong_count", "wrong_colour", "missing_text", "misspelled_text"}
    _, (anchor,) = call(env, "tool_text2image_seed", prompt="a fox")
    drifted = [call(env, "tool_image_edit_qwen", image=anchor.id, prompt="a fox")[0]["defects"] for _ in range(12)]
    assert any(d[0]["kind"] == "identity_drift" for d in drifted)


def test_fidelity_one_never_spoils_and_a_missing_shot_is_listed():
    env = fresh(tool_fidelity={"tool_video_composite": 0.0})
    clips = [call(env, "tool_text2video_veo", prompt=p, duration=4)[1][0] for p in ("a cat", "a car", "a tree")]
    assert all(c.content["defects"] == [] for c in clips)
    record, (video,) = call(env, "tool_video_composite", clips=[c.id for c in clips])
    assert [d["kind"] for d in record["defects"]] == ["missing_shot"]
    names = [s["scene"]["subjects"][0]["name"] for s in video.content["shots"]]
    assert len(set(names)) == 2 and video.attributes["duration"] == 12.0


def test_fidelity_is_seeded():
    runs = []
    for _ in range(2):
        env = fresh(tool_fidelity=0.5)
        runs.append([call(env, "tool_text2image_seed", prompt="two red cats")[0]["defects"] for _ in range(8)])
    assert runs[0] == runs[1] and any(runs[0]) and not all(runs[0])


@pytest.mark.parametrize("options, match", [
    ({"content": "pixels"}, "content"),
    ({"content": "semantic", "tool_fidelity": 1.5}, r"tool_fidelity \(1.5\)"),
    ({"content": "semantic", "tool_fidelity": {"tool_nope": 0.5}}, "tool_nope"),
    ({"content": "semantic", "tool_fidelity": {"*": True}}, "must be a number"),
    ({"tool_fidelity": 0.8}, "content='semantic'"),
    ({"perception_noise": 0.1}, "content='semantic'"),
    ({"content": "semantic", "perception_noise": -1}, "perception_noise"),
])
def test_bad_content_settings_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        VisGenEnv(**options)


def test_the_semantic_env_passes_the_env_checker():
    check_env(VisGenEnv(content="semantic", tool_fidelity=0.5, observe_pixels=True), skip_render_check=True)


# ---- perception ----------------------------------------------------------------------------------

def test_analysis_tools_describe_what_was_rendered():
    env = fresh(tool_fidelity=0.0)
    record, (image,) = call(env, "tool_text2image_seed", prompt="two red cats")
    text = call(env, "tool_image_analysis", image=image.id, question="Is it right?")[0]["text"]
    seen = parse_description(text.split("Shows: ", 1)[1])
    assert seen["subjects"] == image.content["scene"]["subjects"]
    assert "consistent with how it was made" not in text
    _, (clip,) = call(env, "tool_image2video_keling", image=image.id, prompt="pan")
    text = call(env, "tool_video_analysis", video=clip.id)[0]["text"]
    assert text.count("Shot 1 (5 s): ") == 1


def test_perception_noise_misreads_and_zero_noise_never_does():
    clean = fresh()
    _, (picture,) = call(clean, "tool_text2image_seed", prompt="three red cats")
    assert all(parse_description(call(clean, "tool_image_analysis", image=picture.id)[0]["text"])["subjects"]
               == picture.content["scene"]["subjects"] for _ in range(4))
    env = fresh(perception_noise=1.0)
    _, (image,) = call(env, "tool_text2image_seed", prompt="three red cats")
    seen = [parse_description(call(env, "tool_image_analysis", image=image.id)[0]["text"])["subjects"][0]
            for _ in range(6)]
    truth = image.content["scene"]["subjects"][0]
    assert any((s["count"], s["colour"]) != (truth["count"], truth["colour"]) for s in seen)


# ---- fidelity_report: the semantic tier against the attribute tier ---------------------------------

def test_fidelity_report_compares_the_semantic_tier_with_the_attribute_tier(tmp_path, media_db):
    from visenv.scene import render_image
    from visenv.tools.attribute import AttributeBackend
    from visenv.tools.cache_io import read_calls
    from visenv.tools.fidelity import ColourHistogramSimilarity, fidelity_report
    from visenv.tools.semantic import SemanticBackend

    prompts = ("two red cars", "three blue foxes", "one green tree", "four yellow stars")
    lines = []
    for i, prompt in enumerate(prompts):  # prompt-faithful "real" outputs, identities and poses of their own
        render_image(realise(parse_prompt(prompt), {}, 500 + i), 320, 320).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"tool": "tool_text2image_seed", "arguments": {"prompt": prompt},
                                 "file": f"{i}.png", "seed": i + 1}))
    (tmp_path / "calls.jsonl").write_text("\n".join(lines) + "\n")
    tiers = {"attribute": AttributeBackend(media_db), "semantic": SemanticBackend(media_db, root=tmp_path / "r"),
             "spoiled": SemanticBackend(media_db, fidelity=0.0, root=tmp_path / "r")}
    report = fidelity_report(read_calls(tmp_path / "calls.jsonl"), tiers, ColourHistogramSimilarity())
    attribute, semantic, spoiled = (report["tiers"][name] for name in tiers)
    assert semantic["c_tool"] > attribute["c_tool"] + 0.5
    assert (attribute["as_asked"], semantic["as_asked"], spoiled["as_asked"]) == (None, 1.0, 0.0)


def test_vector_envs_merge_the_defects_and_the_backend_pickles():
    import pickle

    import gymnasium

    from visenv.tools.semantic import SemanticBackend

    envs = gymnasium.vector.SyncVectorEnv([lambda f=f: VisGenEnv(content="semantic", tool_fidelity=f) for f in (0.0, 1.0)])
    envs.reset(seed=0)
    turn = format_turn(tool_call={"name": "tool_text2image_seed", "arguments": {"prompt": "two red cats"}})
    info = envs.step([turn, turn])[4]
    defects = info["tool_result"]["defects"]
    assert len(defects[0]) == 1 and defects[1] == []
    json.dumps(defects.tolist())
    backend = pickle.loads(pickle.dumps(SemanticBackend(fidelity={"*": 0.3}, perception_noise=0.2)))
    assert backend.fidelity("tool_x") == 0.3 and backend.perception_noise == 0.2
    with pytest.raises(ConfigError, match="tool_fidelity"):
        SemanticBackend(fidelity=2)
