"""Data pipeline: synthetic shapes, video decoding/sampling, tfds ArrayRecord build and the resumable reader."""

import csv
import json

import numpy as np
import pytest

from show1_jax.data import (
    BatchIterator,
    CaptionCsvError,
    ClipTooShortError,
    SyntheticConfig,
    VideoDecodeError,
    VideoNotFoundError,
    VideoTextData,
    attribute_combinations,
    build_dataset,
    generate_dataset,
    load_caption_embeddings,
    load_clip,
    read_video,
    render_clip,
    resize_frames,
    sample_frame_indices,
    save_caption_embeddings,
    split_combinations,
    videos,
    write_video,
)
from show1_jax.data.synthetic import COLOURS, DIRECTIONS, clip_specs, read_metadata

CONFIG = SyntheticConfig(height=40, width=64, num_frames=8, fps=8.0)
PALETTE = np.asarray(list(COLOURS.values()), np.float32)  # [K, 3]
NAMES = list(COLOURS)


def dominant_colour(frames: np.ndarray, background=(0, 0, 0)) -> str:
    """The palette colour most non-background pixels are closest to."""
    pixels = frames.reshape(-1, 3).astype(np.float32)
    pixels = pixels[np.abs(pixels - np.asarray(background, np.float32)).sum(-1) > 120]
    nearest = np.argmin(((pixels[:, None, :] - PALETTE[None]) ** 2).sum(-1), axis=1)
    return NAMES[np.bincount(nearest, minlength=len(NAMES)).argmax()]


def frame_shift(a: np.ndarray, b: np.ndarray, max_shift: int = 6) -> tuple[int, int]:
    """The circular shift along one axis, (dy, 0) or (0, dx), that best maps frame a onto frame b."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    shifts = [(d, 0) for d in range(-max_shift, max_shift + 1)] + [(0, d) for d in range(-max_shift, max_shift + 1)]
    errors = [np.abs(np.roll(a, (dy, dx), axis=(0, 1)) - b).mean() for dy, dx in shifts]
    return shifts[int(np.argmin(errors))]


def assert_matches_caption(frames: np.ndarray, colour: str, direction: str, speed: int) -> None:
    assert dominant_colour(frames) == colour
    step_y, step_x = DIRECTIONS[direction]
    for t in range(len(frames) - 1):
        assert frame_shift(frames[t], frames[t + 1]) == (step_y * speed, step_x * speed), (colour, direction, t)


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    generate_dataset(folder, 12, CONFIG, seed=3)
    return folder


@pytest.fixture(scope="module")
def built(synthetic_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    report = build_dataset(synthetic_folder, out, frames=8, height=20, width=32, extra_columns=("colour", "direction"))
    return report


# --- synthetic --------------------------------------------------------------------------------------------------------


def test_rendered_clips_match_their_captions():
    specs = clip_specs(len(attribute_combinations(CONFIG)), CONFIG, seed=0)  # every combination once
    assert {s.combination for s in specs} == set(attribute_combinations(CONFIG))
    for spec in specs:
        frames = render_clip(spec, CONFIG)
        assert frames.shape == (8, 40, 64, 3) and frames.dtype == np.uint8
        article = "an" if spec.colour[0] in "aeiou" else "a"
        assert spec.caption == f"{article} {spec.colour} {spec.shape} moving {spec.direction}"
        assert_matches_caption(frames, spec.colour, spec.direction, CONFIG.speed)


def test_written_videos_match_their_captions(synthetic_folder):
    with open(synthetic_folder / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["video_path", "caption", "colour", "shape", "direction"]
    metadata = read_metadata(synthetic_folder)
    assert len(rows) == len(metadata) == 12
    for row, meta in zip(rows, metadata):
        assert row["caption"] == meta["caption"] and row["video_path"] == meta["video_path"]
        video = read_video(synthetic_folder / row["video_path"])
        assert video.frames.shape == (8, 40, 64, 3) and video.fps == 8.0
        assert_matches_caption(video.frames, row["colour"], row["direction"], meta["speed"])


def test_shape_wraps_around_the_frame():
    spec = clip_specs(1, SyntheticConfig(directions=("right",), num_frames=30), seed=0)[0]
    frames = render_clip(spec, SyntheticConfig(directions=("right",), num_frames=30))
    # 30 frames x 3 px > 64 px: the shape crosses the right edge and comes back on the left, never vanishing.
    assert all((f.sum(-1) > 0).sum() > 20 for f in frames)
    columns = [np.nonzero((f.sum(-1) > 0).any(0))[0] for f in frames]
    assert any(c.min() == 0 and c.max() == 63 for c in columns)  # split across both edges at some frame


def test_generation_is_deterministic():
    assert clip_specs(20, CONFIG, seed=7) == clip_specs(20, CONFIG, seed=7)
    assert clip_specs(20, CONFIG, seed=7) != clip_specs(20, CONFIG, seed=8)


def test_start_spread_centres_the_path():
    config = SyntheticConfig(height=40, width=64, num_frames=9, speed=2, start_spread=3.0)
    specs = clip_specs(200, config, seed=3)
    for s in specs:
        dy, dx = DIRECTIONS[s.direction]
        # the middle frame (4 frames of 2 px after the start) lies within 3 px of the frame's centre, on the torus
        mid_y = (s.center_y + 8 * dy) % 40 - 20
        mid_x = (s.center_x + 8 * dx) % 64 - 32
        assert abs(mid_y) <= 3.01 and abs(mid_x) <= 3.01, s
    offsets = np.array([[(s.center_y + 8 * DIRECTIONS[s.direction][0]) % 40 - 20] for s in specs])
    assert offsets.std() > 1.0  # spread, not one fixed start
    # None keeps uniform starts; the combinations are dealt the same either way
    uniform = clip_specs(200, SyntheticConfig(height=40, width=64, num_frames=9, speed=2), seed=3)
    assert max(s.center_x for s in uniform) > 50 and min(s.center_x for s in uniform) < 14
    assert [s.combination for s in uniform] == [s.combination for s in specs]
    with pytest.raises(ValueError, match="start_spread"):
        SyntheticConfig(height=40, width=64, start_spread=25.0)


def test_held_out_split_is_disjoint_and_keeps_every_pair_in_training(tmp_path):
    split = split_combinations(CONFIG, held_out_fraction=0.2, seed=0)
    combos = attribute_combinations(CONFIG)
    assert set(split.train).isdisjoint(split.held_out)
    assert set(split.train) | set(split.held_out) == set(combos)
    assert len(split.held_out) == round(0.2 * len(combos))
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert {(c[a], c[b]) for c in split.train} == {(c[a], c[b]) for c in combos}
    assert split == split_combinations(CONFIG, held_out_fraction=0.2, seed=0)
    assert split != split_combinations(CONFIG, held_out_fraction=0.2, seed=1)
    with pytest.raises(ValueError, match="lower held_out_fraction"):
        split_combinations(CONFIG, held_out_fraction=0.9)
    specs = generate_dataset(tmp_path, 6, SyntheticConfig(video_format="gif"), combinations=split.held_out)
    assert {s.combination for s in specs} <= set(split.held_out)


# --- videos -----------------------------------------------------------------------------------------------------------


def index_frames(n: int, h: int = 16, w: int = 24) -> np.ndarray:
    """Frames whose grey level encodes their index (8 levels apart, robust to H.264)."""
    return np.broadcast_to((np.arange(n, dtype=np.uint8) * 8)[:, None, None, None], (n, h, w, 3)).copy()


@pytest.mark.parametrize("suffix", ["mp4", "gif"])
def test_decode_round_trip(tmp_path, suffix):
    frames = index_frames(12)
    write_video(tmp_path / f"v.{suffix}", frames, fps=10.0)
    video = read_video(tmp_path / f"v.{suffix}")
    assert video.frames.shape == (12, 16, 24, 3) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(10.0)
    np.testing.assert_allclose(video.timestamps, np.arange(12) / 10.0, atol=1e-9)
    tolerance = 0 if suffix == "gif" else 2  # GIF is lossless for <= 256 colours; H.264 at crf 10 nearly so
    assert np.abs(video.frames.astype(int) - frames).max() <= tolerance


@pytest.mark.parametrize("decode_whole", [True, False], ids=["whole", "streamed"])
def test_fps_resampling_picks_the_right_frames(tmp_path, monkeypatch, decode_whole):
    if not decode_whole:  # long videos are counted, then streamed keeping only the needed frames
        monkeypatch.setattr(videos, "_DECODE_WHOLE_BYTES", 0)
    write_video(tmp_path / "v.mp4", index_frames(30), fps=30.0)
    clip = load_clip(tmp_path / "v.mp4", 8, fps=10.0, start=2)
    np.testing.assert_array_equal(clip.indices, 2 + 3 * np.arange(8))
    np.testing.assert_array_equal(np.round(clip.frames[:, 0, 0, 0] / 8), 2 + 3 * np.arange(8))
    assert clip.fps == 10.0
    # GIF timing comes from per-frame delays: 30 ms frames are 33.3 fps; at 10 fps every 100 ms -> frame 0, 3, 6, 10...
    write_video(tmp_path / "v.gif", index_frames(30), fps=33.3)
    clip = load_clip(tmp_path / "v.gif", 8, fps=10.0)
    np.testing.assert_array_equal(clip.indices, [0, 3, 6, 10, 13, 16, 20, 23])


def test_frame_index_sampling():
    t = np.arange(30) / 30.0
    np.testing.assert_array_equal(sample_frame_indices(t, 1.0, 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(sample_frame_indices(t, 1.0, 4, start="center"), [13, 14, 15, 16])
    np.testing.assert_array_equal(sample_frame_indices(t, 1.0, 4, fps=60.0), [0, 0, 1, 1])  # above the source rate
    starts = {int(sample_frame_indices(t, 1.0, 8, fps=10.0, start=np.random.default_rng(i))[0]) for i in range(200)}
    assert starts == set(range(9))  # every start whose last target time (start + 0.7 s) is inside the 1 s video
    a = sample_frame_indices(t, 1.0, 8, fps=10.0, start=np.random.default_rng(5))
    np.testing.assert_array_equal(a, sample_frame_indices(t, 1.0, 8, fps=10.0, start=np.random.default_rng(5)))
    with pytest.raises(ClipTooShortError, match="30 frames, 11 requested at 10 fps"):
        sample_frame_indices(t, 1.0, 11, fps=10.0, path="x.mp4")
    with pytest.raises(ClipTooShortError, match="from start frame 9"):
        sample_frame_indices(t, 1.0, 8, fps=10.0, start=9)


def test_resize_center_crops_to_the_aspect_ratio():
    frames = np.zeros((2, 40, 100, 3), np.uint8)
    frames[:, :, :8] = 255  # a white band at the left, outside the centred 40x80 window (and the filter's reach)
    out = resize_frames(frames, 20, 40)
    assert out.shape == (2, 20, 40, 3) and out.max() == 0
    stretched = resize_frames(frames, 20, 40, crop="none")
    assert stretched[:, :, :2].min() == 255
    np.testing.assert_array_equal(resize_frames(np.full((1, 40, 64, 3), 77, np.uint8), 20, 32, resample="area"), 77)


def test_decode_errors_name_the_path(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "bad.gif").write_text("not a gif")
    for name in ("bad.mp4", "bad.gif"):
        with pytest.raises(VideoDecodeError, match=f"cannot decode video .*{name}") as info:
            load_clip(tmp_path / name, 8)
        assert info.value.path == str(tmp_path / name)
    with pytest.raises(VideoNotFoundError, match="missing.mp4 does not exist"):
        read_video(tmp_path / "missing.mp4")
    write_video(tmp_path / "short.mp4", index_frames(5), fps=10.0)
    with pytest.raises(ClipTooShortError, match=r"short.mp4 is too short: it has 5 frames, 8 requested") as info:
        load_clip(tmp_path / "short.mp4", 8)
    assert (info.value.num_frames, info.value.requested) == (5, 8)


# --- dataset ----------------------------------------------------------------------------------------------------------


def test_build_and_read_back_equals_the_source_frames(built, synthetic_folder):
    data = VideoTextData(built.path)
    assert built.num_examples == len(data) == 12 and built.skipped == ()
    assert (data.frames, data.height, data.width) == (8, 20, 32)
    with open(synthetic_folder / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):  # records keep the CSV order
        example = data[i]
        expected = resize_frames(read_video(synthetic_folder / row["video_path"]).frames, 20, 32)
        np.testing.assert_array_equal(example["video"], expected)
        assert example["caption"] == row["caption"] and example["video_path"] == row["video_path"]
        assert (example["colour"], example["direction"]) == (row["colour"], row["direction"])
        assert example["fps"] == 8.0
        np.testing.assert_array_equal(example["frame_indices"], np.arange(8))
    assert data.metadata["skipped"] == [] and data.metadata["height"] == 20


def test_batches_have_the_documented_layout(built):
    batch = next(VideoTextData(built.path).batches(5, seed=0))
    assert batch["video"].shape == (5, 8, 20, 32, 3) and batch["video"].dtype == np.uint8
    assert len(batch["caption"]) == 5 and all(isinstance(c, str) for c in batch["caption"])
    assert batch["fps"].shape == (5,) and batch["index"].shape == (5,)
    as_float = next(VideoTextData(built.path).batches(5, seed=0, as_float=True))
    assert as_float["video"].dtype == np.float32
    assert -1.0 <= as_float["video"].min() and as_float["video"].max() <= 1.0
    np.testing.assert_allclose(as_float["video"], batch["video"] / 127.5 - 1.0, atol=1e-6)


def test_iterator_resumes_exactly(built):
    uninterrupted = VideoTextData(built.path).batches(5, seed=11)
    expected = [next(uninterrupted) for _ in range(9)]  # 45 examples: crosses three epoch boundaries of 12
    first = VideoTextData(built.path).batches(5, seed=11)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert state["epoch"] == 1 and state["position"] == 8
    resumed = VideoTextData(built.path).batches(5, seed=11)
    resumed.set_state(state)
    for want in expected[4:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["video"], want["video"])
        np.testing.assert_array_equal(got["index"], want["index"])
        assert got["caption"] == want["caption"]
    with pytest.raises(ValueError, match="seed=11 but this iterator has seed=12"):
        VideoTextData(built.path).batches(5, seed=12).set_state(state)


def test_epochs_are_seeded_permutations(built):
    data = VideoTextData(built.path)
    it = data.batches(4, seed=0)
    epochs = [np.concatenate([next(it)["index"] for _ in range(3)]) for _ in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(12))
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(epochs[0], np.random.default_rng([0, 0]).permutation(12))
    plain = [b["index"].tolist() for b in data.batches(5, shuffle=False, num_epochs=1, drop_remainder=False)]
    assert plain == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert len(list(data.batches(5, shuffle=False, num_epochs=1))) == 2


@pytest.mark.parametrize("process_count", [2, 5])
def test_host_shards_are_disjoint_and_cover_everything(built, process_count):
    data = VideoTextData(built.path)
    for epoch in range(2):
        shards = []
        for p in range(process_count):
            it = data.batches(
                2, seed=4, num_epochs=epoch + 1, process_index=p, process_count=process_count, drop_remainder=False
            )
            it.set_state({"epoch": epoch, "position": 0})
            shards.append([i for b in it for i in b["index"].tolist()])
        flat = [i for s in shards for i in s]
        assert len(flat) == len(set(flat)) == 12 and set(flat) == set(range(12))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_groups_of_consecutive_rows_stay_together_in_a_batch(built):
    data = VideoTextData(built.path)  # 12 rows: groups {0,1,2}, {3,4,5}, ...
    it = data.batches(6, seed=3, group_size=3)
    seen = []
    for _ in range(4):  # two epochs
        index = next(it)["index"].tolist()
        for start in (0, 3):
            group = index[start : start + 3]
            assert group[0] % 3 == 0 and group == list(range(group[0], group[0] + 3))
        seen.append(index)
    assert sorted(seen[0] + seen[1]) == list(range(12)) and seen[:2] != seen[2:]
    groups = np.random.default_rng([3, 0]).permutation(4)
    assert seen[0] + seen[1] == [int(g) * 3 + k for g in groups for k in range(3)]
    shards = [[i for b in data.batches(3, seed=1, num_epochs=1, process_index=p, process_count=2, group_size=3)
               for i in b["index"].tolist()] for p in range(2)]  # fmt: skip
    assert sorted(shards[0] + shards[1]) == list(range(12)) and all(len(s) == 6 for s in shards)
    with pytest.raises(ValueError, match="must be >= 1 and divide both the .per-host. batch size 4"):
        data.batches(4, group_size=3)
    with pytest.raises(ValueError, match="number of examples 12"):
        data.batches(5, group_size=5)
    with pytest.raises(ValueError, match="4 groups of 3 cannot be split over 5 hosts"):
        data.batches(3, group_size=3, process_count=5)


def test_embeddings_are_stored_and_batched(synthetic_folder, tmp_path):
    with open(synthetic_folder / "captions.csv", newline="") as f:
        captions = sorted({r["caption"] for r in csv.DictReader(f)})
    rng = np.random.default_rng(0)
    table = {c: rng.standard_normal((6, 4)).astype(np.float16) for c in captions}
    for suffix in ("npz", "safetensors"):
        path = save_caption_embeddings(tmp_path / f"emb.{suffix}", table)
        loaded = load_caption_embeddings(path)
        assert loaded.keys() == table.keys() and all(np.array_equal(loaded[c], table[c]) for c in captions)
    report = build_dataset(synthetic_folder, tmp_path / "ds", embeddings=tmp_path / "emb.safetensors", start="first")
    batch = next(VideoTextData(report.path).batches(4, seed=0))
    assert batch["embeddings"].shape == (4, 6, 4) and batch["embeddings"].dtype == np.float16
    for caption, emb in zip(batch["caption"], batch["embeddings"]):
        np.testing.assert_array_equal(emb, table[caption])
    with pytest.raises(KeyError, match="have no entry in the embeddings"):
        build_dataset(synthetic_folder, tmp_path / "ds2", embeddings={captions[0]: table[captions[0]]})


@pytest.fixture()
def bad_folder(synthetic_folder, tmp_path):
    import shutil

    (tmp_path / "videos").mkdir()
    for name in ("00000.mp4", "00001.mp4"):
        shutil.copy(synthetic_folder / "videos" / name, tmp_path / "videos" / name)
    (tmp_path / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    write_video(tmp_path / "videos" / "short.gif", index_frames(4, 40, 64), fps=8.0)
    rows = [("videos/00000.mp4", "ok"), ("videos/corrupt.mp4", "corrupt"), ("videos/missing.mp4", "missing"),
            ("videos/short.gif", "short"), ("videos/00001.mp4", "ok too")]  # fmt: skip
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("video_path", "caption"), *rows])
    return tmp_path


def test_bad_rows_raise_naming_the_path(bad_folder, tmp_path):
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        build_dataset(bad_folder, tmp_path / "out")
    rows = [("videos/00000.mp4", "a"), ("videos/short.gif", "b")]
    with open(bad_folder / "short.csv", "w", newline="") as f:
        csv.writer(f).writerows([("video_path", "caption"), *rows])
    with pytest.raises(ClipTooShortError, match="short.gif is too short: it has 4 frames, 8 requested"):
        build_dataset(bad_folder / "short.csv", tmp_path / "out2")


def test_skip_bad_finishes_and_reports_every_skipped_path(bad_folder, tmp_path):
    calls = []
    report = build_dataset(bad_folder, tmp_path / "out", skip_bad=True, progress=lambda done, total: calls.append(done))
    assert report.num_examples == 2 and calls == [1, 2, 3, 4, 5]
    assert [(b.row, b.video_path, b.error) for b in report.skipped] == [
        (1, "videos/corrupt.mp4", "VideoDecodeError"),
        (2, "videos/missing.mp4", "VideoNotFoundError"),
        (3, "videos/short.gif", "ClipTooShortError"),
    ]
    data = VideoTextData(tmp_path / "out")  # found below the data dir
    assert [data[i]["caption"] for i in range(len(data))] == ["ok", "ok too"]
    assert [b["video_path"] for b in data.metadata["skipped"]] == [b.video_path for b in report.skipped]
    with pytest.raises(ValueError, match="all 5 rows of .*captions.csv were skipped as bad videos"):
        build_dataset(bad_folder, tmp_path / "out", frames=20, skip_bad=True, overwrite=True)


def test_csv_errors_name_the_file_and_its_columns(tmp_path, synthetic_folder):
    video = synthetic_folder / "videos" / "00000.mp4"  # absolute paths are used as they are
    with open(tmp_path / "webvid.csv", "w", newline="") as f:
        csv.writer(f).writerows([("videoid", "name"), (str(video), "a clip")])
    with pytest.raises(CaptionCsvError, match=r"webvid.csv has no column 'caption'.*\['videoid', 'name'\]"):
        build_dataset(tmp_path / "webvid.csv", tmp_path / "out", video_column="videoid")
    report = build_dataset(tmp_path / "webvid.csv", tmp_path / "out", video_column="videoid", caption_column="name")
    assert report.num_examples == 1 and VideoTextData(report.path)[0]["caption"] == "a clip"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_dataset(tmp_path / "webvid.csv", tmp_path / "out", video_column="videoid", caption_column="name")


def test_iterator_rejects_bad_arguments(built):
    data = VideoTextData(built.path)
    with pytest.raises(ValueError, match="process_index 2 is outside"):
        BatchIterator(data, 2, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="cannot be split over 13 hosts"):
        data.batches(1, process_count=13)


def test_direction_groups_hold_the_four_directions_of_one_pair_and_point_at_the_source_clips(tmp_path):
    from show1_jax.data import write_direction_groups

    config = SyntheticConfig(height=40, width=64, num_frames=8, fps=8.0, colours=("red", "blue"), shapes=("circle",))
    held_out = ("blue", "circle", "up")
    combos = [c for c in attribute_combinations(config) if tuple(c) != held_out]
    generate_dataset(tmp_path / "source", 28, config, combinations=combos, seed=0)
    target = write_direction_groups(tmp_path / "source", tmp_path / "groups", groups_per_pair=3, seed=1)
    with open(target, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * len(DIRECTIONS) and not (tmp_path / "groups" / "captions.csv.tmp").exists()
    for start in range(0, len(rows), len(DIRECTIONS)):
        group = rows[start : start + len(DIRECTIONS)]
        assert [r["direction"] for r in group] == list(DIRECTIONS)
        assert all((tmp_path / "groups" / r["video_path"]).resolve().is_file() for r in group)
        assert all(r["caption"] == f"a {r['colour']} circle moving {r['direction']}" for r in group)
        pair = group[0]["colour"]
        for r in group:  # the held-out triple is filled with the same shape in another colour
            expected = "red" if (pair, "circle", r["direction"]) == held_out else pair
            assert r["colour"] == expected
