"""The media database: real files, content hashes, seeded sampling, folders, pickling, concurrent builds."""

import collections
import io
import json
import multiprocessing
import pickle
import random
import wave

import av
import numpy as np
import pytest
from PIL import Image

from visenv.error import MediaDatabaseError
from visenv.media import sha256_file
from visenv.mediadb import MediaDatabase, default_root, thumbnail
from visenv.procedural_media import image_resolutions, mp4_video, png_image, wav_audio
from visenv.tools.specs import TOOLS


def test_default_db_holds_every_text2image_resolution(media_db):
    counts = collections.Counter((e.attributes["width"], e.attributes["height"]) for e in media_db.entries("image"))
    wanted = {tuple(res) for spec in TOOLS.values() if spec.group == "text2image"
              for res in spec.output.resolutions.values()}
    assert set(counts) == wanted and len(wanted) == 20
    assert set(counts.values()) == {3}
    videos = collections.Counter((e.attributes["width"], e.attributes["height"], e.attributes["duration"])
                                 for e in media_db.entries("video"))
    assert videos == {(w, h, float(d)): 2 for w, h in ((1280, 720), (720, 1280)) for d in (4, 5, 6, 8, 10)}
    audio = collections.Counter(e.attributes["duration"] for e in media_db.entries("audio"))
    assert audio == {float(d): 2 for d in (5, 10, 15, 30, 60)}
    assert media_db.kinds() == ("image", "video", "audio") and len(media_db) == 90


def test_images_are_pngs_of_the_recorded_size_and_hash(media_db):
    for entry in media_db.entries("image"):
        with Image.open(entry.path) as image:
            assert image.format == "PNG"
            assert image.size == (entry.attributes["width"], entry.attributes["height"])
        assert sha256_file(entry.path) == entry.sha256
        assert entry.path.endswith(f"blobs/{entry.sha256[:2]}/{entry.sha256}.png")


def test_videos_decode_to_the_recorded_duration_and_fps(media_db):
    for entry in media_db.entries("video"):
        with av.open(entry.path) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [frame for frame in container.decode(stream)]
        assert (frames[0].width, frames[0].height) == (entry.attributes["width"], entry.attributes["height"])
        assert frames[0].format.name == "yuv420p"
        assert float(stream.average_rate) == entry.attributes["fps"] == 24
        assert abs(len(frames) / entry.attributes["fps"] - entry.attributes["duration"]) <= 0.1
        assert sha256_file(entry.path) == entry.sha256


def test_audio_is_wav_of_the_recorded_duration(media_db):
    for entry in media_db.entries("audio"):
        with wave.open(entry.path, "rb") as track:
            assert (track.getnchannels(), track.getsampwidth(), track.getframerate()) == (1, 2, 22050)
            assert abs(track.getnframes() / track.getframerate() - entry.attributes["duration"]) < 1e-3
            samples = np.frombuffer(track.readframes(track.getnframes()), "<i2")
        assert samples.std() > 1000  # a real signal, not silence
        assert entry.attributes["sample_rate"] == 22050
        assert sha256_file(entry.path) == entry.sha256


def test_default_reopens_from_the_index_without_rebuilding(media_db, monkeypatch):
    monkeypatch.setattr("visenv.mediadb.write_default_media", lambda blobs: pytest.fail("rebuilt"))
    media_root = media_db.entries()[0].path.split("/blobs/")[0]
    reopened = MediaDatabase.default(media_root)
    assert reopened.entries() == media_db.entries()
    index = json.loads(open(f"{media_root}/index.json").read())
    assert index["format"] == "visenv-media-index" and len(index["entries"]) == 90
    assert not index["entries"][0]["path"].startswith("/")  # relative: the folder can move


def test_default_root_follows_visenv_home(monkeypatch, tmp_path):
    monkeypatch.setenv("VISENV_HOME", str(tmp_path))
    assert default_root() == tmp_path / "media-v1"


def test_default_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MediaDatabaseError, match="neither empty nor a media database"):
        MediaDatabase.default(tmp_path)


@pytest.mark.parametrize("rng_factory", [random.Random, np.random.default_rng])
def test_sampling_is_deterministic_for_a_seed(media_db, rng_factory):
    def draw(seed):
        rng = rng_factory(seed)
        return [media_db.sample(kind, rng).sha256 for kind in ("image", "video", "audio") for _ in range(5)]

    assert draw(7) == draw(7)
    assert len({tuple(draw(seed)) for seed in range(10)}) > 1


def test_sampling_returns_the_exact_resolution_and_duration(media_db):
    rng = random.Random(0)
    for width, height in image_resolutions():
        entry = media_db.sample("image", rng, width=width, height=height)
        assert (entry.attributes["width"], entry.attributes["height"]) == (width, height)
    for duration in (4, 5, 6, 8, 10):
        entry = media_db.sample("video", rng, width=720, height=1280, duration=duration)
        attributes = entry.attributes
        assert (attributes["width"], attributes["height"], attributes["duration"]) == (720, 1280, duration)
    assert media_db.sample("audio", rng, duration=30).attributes["duration"] == 30


def test_sampling_falls_back_to_aspect_then_size_then_duration(media_db):
    rng = random.Random(0)
    near_square = media_db.sample("image", rng, width=1000, height=1000).attributes
    assert (near_square["width"], near_square["height"]) == (1024, 1024)
    wide = media_db.sample("image", rng, width=4096, height=2304).attributes  # 16:9, larger than any
    assert (wide["width"], wide["height"]) == (2048, 1152)
    upscaled = media_db.sample("video", rng, width=2560, height=1440, duration=23.5).attributes
    assert (upscaled["width"], upscaled["height"], upscaled["duration"]) == (1280, 720, 10.0)
    tied = {media_db.sample("video", random.Random(s), width=1280, height=720, duration=7).attributes["duration"]
            for s in range(40)}
    assert tied == {6.0, 8.0}
    assert {media_db.sample("audio", random.Random(s), duration=12.5).attributes["duration"]
            for s in range(40)} == {10.0, 15.0}


def test_sampling_is_uniform_over_equally_good_entries(media_db):
    counts = collections.Counter(media_db.sample("image", random.Random(s), width=1024, height=1024).sha256
                                 for s in range(600))
    assert len(counts) == 3 and min(counts.values()) > 150


def test_sample_many_is_distinct_while_candidates_last_and_honours_exclude(media_db):
    three = media_db.sample_many("image", 3, random.Random(1), width=2048, height=2048)
    assert len({e.sha256 for e in three}) == 3
    five = media_db.sample_many("image", 5, np.random.default_rng(1), width=2048, height=2048)
    assert len(five) == 5 and len({e.sha256 for e in five}) == 3
    banned = three[0].sha256
    for seed in range(20):
        picked = media_db.sample_many("image", 2, random.Random(seed), width=2048, height=2048,
                                      exclude=frozenset({banned}))
        assert banned not in {e.sha256 for e in picked}


def test_sampling_a_missing_kind_raises(tmp_path):
    (tmp_path / "a.png").write_bytes(png_image(32, 16, seed=1))
    images_only = MediaDatabase.from_folder(tmp_path)
    with pytest.raises(MediaDatabaseError, match="no video entry"):
        images_only.sample("video", random.Random(0))


def _flac(seconds: float, rate: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        samples = (np.sin(np.arange(int(seconds * rate)) / 10) * 8000).astype("<i2")[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def test_from_folder_reads_attributes_and_skips_unreadable_files(tmp_path):
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    (tmp_path / "wide.png").write_bytes(png_image(64, 36, seed=1))
    Image.new("RGB", (30, 50), "red").save(tmp_path / "nested" / "tall.JPG")
    (tmp_path / "nested" / "clip.mp4").write_bytes(mp4_video(96, 64, 2, 12, seed=2))
    (tmp_path / "nested" / "deeper" / "voice.wav").write_bytes(wav_audio(3, 8000, seed=3))
    (tmp_path / "song.flac").write_bytes(_flac(1.5, 16000))
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    (tmp_path / "notes.txt").write_text("ignored: not a media suffix")
    before = sorted(p.name for p in tmp_path.rglob("*"))

    with pytest.warns(UserWarning, match="junk.png"):
        db = MediaDatabase.from_folder(tmp_path)

    by_name = {entry.path.rsplit("/", 1)[1]: entry for entry in db.entries()}
    assert set(by_name) == {"wide.png", "tall.JPG", "clip.mp4", "voice.wav", "song.flac"}
    assert by_name["wide.png"].attributes == {"width": 64, "height": 36}
    assert by_name["tall.JPG"].attributes == {"width": 30, "height": 50}
    clip = by_name["clip.mp4"].attributes
    assert (clip["width"], clip["height"], clip["fps"]) == (96, 64, 12) and abs(clip["duration"] - 2) <= 0.1
    assert by_name["voice.wav"].attributes == {"duration": 3.0, "sample_rate": 8000}
    assert by_name["song.flac"].attributes["sample_rate"] == 16000
    assert abs(by_name["song.flac"].attributes["duration"] - 1.5) <= 0.05
    assert all(sha256_file(e.path) == e.sha256 for e in db.entries())
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written into the user's folder


def test_from_folder_refuses_empty_and_missing_folders(tmp_path):
    (tmp_path / "readme.txt").write_text("no media here")
    with pytest.raises(MediaDatabaseError, match="holds no readable media file"):
        MediaDatabase.from_folder(tmp_path)
    with pytest.raises(MediaDatabaseError, match="does not exist"):
        MediaDatabase.from_folder(tmp_path / "missing")


def test_pickle_round_trip_is_small_and_samples_alike(media_db):
    data = pickle.dumps(media_db)
    assert len(data) < 64_000  # the index, not the files
    clone = pickle.loads(data)
    assert clone.entries() == media_db.entries()
    for seed in range(5):
        assert (clone.sample("video", random.Random(seed), width=720, height=1280, duration=9)
                == media_db.sample("video", random.Random(seed), width=720, height=1280, duration=9))


def _build_and_list(root: str) -> list[tuple[str, str]]:
    return [(e.sha256, e.path) for e in MediaDatabase.default(root).entries()]


@pytest.mark.slow
def test_two_processes_building_at_once_agree(tmp_path):
    root = str(tmp_path / "shared-media")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        first, second = pool.map(_build_and_list, [root, root])
    assert first == second and len(first) == 90
    assert all(sha256_file(path) == sha for sha, path in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared-media"]  # no staging folder left behind


def test_thumbnails_are_letterboxed_memoised_and_read_only(media_db):
    portrait = media_db.sample("image", random.Random(0), width=576, height=1024)
    picture = thumbnail(portrait.path, "image", 64)
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
    assert not picture.flags.writeable
    assert picture[:, :8].max() == 0 and picture[:, 30:34].max() > 0  # black bars beside a portrait image
    assert thumbnail(portrait.path, "image", 64) is picture
    video = thumbnail(media_db.sample("video", random.Random(0), width=1280, height=720).path, "video", 48)
    assert video.shape == (48, 48, 3) and video[:6].max() == 0 and video[20:28].max() > 0
    audio = thumbnail(media_db.sample("audio", random.Random(0)).path, "audio", 32)
    assert audio.shape == (32, 32, 3) and len(np.unique(audio.reshape(-1, 3), axis=0)) >= 2
