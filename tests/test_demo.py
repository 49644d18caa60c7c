"""Show-1 Shapes (show1_jax/demo.py): the recipe's settings, the shipped layout and the default-weights choice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from show1_jax import cli, demo
from show1_jax.data.synthetic import DIRECTIONS, attribute_combinations
from show1_jax.loading import flat_params, load_component, save_converted
from show1_jax.tiny import TINY_BASE, TINY_IF2, TINY_INTERP, TINY_SR1, TINY_SR2, TINY_VAE, random_model
from show1_jax.unet3d import UNet2DConditionModel, UNet3DConditionModel
from show1_jax.vae import AutoencoderKL


def test_split_holds_out_unseen_triples():
    split = demo.split()
    assert set(split.train).isdisjoint(split.held_out)
    assert set(split.train) | set(split.held_out) == set(attribute_combinations(demo.DATASET))
    assert 0.15 <= len(split.held_out) / len(attribute_combinations(demo.DATASET)) <= 0.25
    # The validation prompts (settings are chosen on them) are training triples, as many as the held-out ones, and
    # name every attribute value of the dataset.
    validation = demo.validation_combinations()
    assert len(validation) == len(split.held_out) and set(validation) <= set(split.train)
    assert validation == demo.validation_combinations() and len(set(validation)) == len(validation)
    for attribute, values in (("colour", demo.DATASET.colours), ("shape", demo.DATASET.shapes),
                              ("direction", demo.DATASET.directions)):  # fmt: skip
        assert {getattr(c, attribute) for c in validation} == set(values)


CLIP_SET_OF = {"keyframes_c": "clips_c", "keyframes_c1": "clips_c1", "keyframes_pe": "clips_c1",
               "keyframes_c0": "clips_c0", "keyframes_quad": "clips_quad", "keyframes_quad2": "clips_quad",
               "keyframes_quad3": "clips_quad", "keyframes_splice": "clips_splice",
               "keyframes_splice_b": "clips_splice"}  # fmt: skip


def test_stage_settings_fill_paths_and_scale_steps(tmp_path):
    for run in demo.STAGES:
        settings = demo.stage_settings(run, tmp_path, steps_scale=0.5)
        full = demo.stage_settings(run, tmp_path)
        assert settings.stage == ("vae" if run.startswith("vae") else run.split("_")[0].replace("first", "first_frame"))
        assert settings.steps == max(1, round(full.steps * 0.5))
        assert Path(settings.workdir) == tmp_path / "runs" / run
        clip_set = Path(settings.data.source).name
        assert Path(settings.data.source).parent == tmp_path
        assert clip_set == CLIP_SET_OF.get(run, "clips")
        suffix = "" if clip_set == "clips" else f"_{clip_set}"  # one dataset per trainer stage and clip set
        assert Path(settings.data.build_dir) == tmp_path / "data" / f"{settings.stage}{suffix}"
    chain = [demo.stage_settings(run, tmp_path) for run in demo.KEYFRAME_RUNS]
    for parent, child in zip(demo.KEYFRAME_RUNS, chain[1:]):  # each keyframe run continues the one before
        assert child.model.pretrained == str(tmp_path / "runs" / parent / "unet")
    assert demo.REPOS[demo.KEYFRAME_RUNS[-1]] == ("show-1-base", "unet")
    pe, quad = demo.stage_settings("keyframes_pe", tmp_path), demo.stage_settings("keyframes_quad", tmp_path)
    assert pe.model.config_overrides == {"temporal_position_embedding": "sinusoidal"}
    assert (quad.data.batch_group_size, quad.diffusion.min_timestep) == (4, 930)
    assert demo.stage_settings("keyframes_long", tmp_path).optim.decay_steps == 3000
    # finetunes start from their parent's export; the switched keyframe model exports a v-prediction scheduler
    v = demo.stage_settings("keyframes_v", tmp_path)
    assert v.model.pretrained == str(tmp_path / "runs" / "keyframes" / "unet") and v.model.config is None
    assert v.diffusion.prediction_type == "v_prediction"
    assert demo.stage_settings("vae_more", tmp_path).model.pretrained == str(tmp_path / "runs" / "vae" / "vae")
    assert demo.stage_settings("sr2", tmp_path).model.vae == str(tmp_path / "runs" / "vae_more" / "vae")
    # the decoder-only run continues vae_more, so SR2's latent space is the shipped VAE's
    restore = demo.stage_settings("vae_restore", tmp_path)
    assert restore.model.pretrained == str(tmp_path / "runs" / "vae_more" / "vae")
    assert restore.optim.trainable == "decoder" and restore.vae.degrade_prob > 0
    assert not restore.vae.fit_scaling_factor
    vivid = demo.stage_settings("vae_vivid", tmp_path)  # and learns SR1's duller colours on from it
    assert vivid.model.pretrained == str(tmp_path / "runs" / "vae_restore" / "vae")
    assert vivid.optim.trainable == "decoder" and vivid.vae.degrade_saturation > 0 and not vivid.vae.fit_scaling_factor
    assert demo.REPOS["vae_vivid"] == ("show-1-sr2", "vae")
    sr2_more = demo.stage_settings("sr2_more", tmp_path)  # SR2's UNet on at the low noise levels it samples at
    assert sr2_more.model.pretrained == str(tmp_path / "runs" / "sr2" / "unet")
    assert sr2_more.model.vae == str(tmp_path / "runs" / "vae_more" / "vae") and sr2_more.diffusion.max_timestep == 250
    assert demo.REPOS["sr2_more"] == ("show-1-sr2", "unet")
    assert demo.stage_settings("sr2", tmp_path).data.text_encoder.endswith("show-1-sr2/text_encoder")
    assert demo.stage_settings("keyframes", tmp_path).data.text_encoder.endswith("show-1-base/text_encoder")
    assert demo.stage_settings("keyframes", tmp_path, overrides=["steps=3"]).steps == 3
    with pytest.raises(ValueError, match="unknown stages"):
        demo.train_recipe(tmp_path, tmp_path / "out", stages=["keyframes", "sr3"])
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken exists: choose a new output folder"):
        demo.train_recipe(tmp_path / "work", tmp_path / "taken")
    assert not (tmp_path / "work").exists()  # refused before rendering or training anything


def fake_runs(workdir: Path) -> None:
    """Random models where a finished recipe leaves its trained ones (plus the recipe's text encoders)."""
    models = {
        demo.KEYFRAME_RUNS[-1]: (UNet3DConditionModel, TINY_BASE),
        "interpolation": (UNet3DConditionModel, TINY_INTERP),
        "first_frame": (UNet2DConditionModel, TINY_IF2),
        "sr1": (UNet3DConditionModel, TINY_SR1),
        "sr2_more": (UNet3DConditionModel, TINY_SR2),
        "vae_vivid": (AutoencoderKL, TINY_VAE),
    }
    for i, (stage, (cls, config)) in enumerate(models.items()):
        run = workdir / "runs" / stage
        save_converted(random_model(cls, config, seed=i), run / demo.REPOS[stage][1])
        if demo.REPOS[stage][1] == "unet":
            (run / "scheduler").mkdir(parents=True)
            (run / "scheduler" / "scheduler_config.json").write_text("{}")
    demo.write_text_encoders(workdir / "text")


def test_assemble_writes_the_released_layout_in_float16(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained model"):
        demo.assemble(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fake_runs(tmp_path)
    out = demo.assemble(tmp_path, tmp_path / "out")
    for run, (repo, component) in demo.REPOS.items():
        trained = flat_params(load_component(tmp_path / "runs" / run / component, dtype=jnp.float32))
        shipped = flat_params(load_component(out / repo / component, dtype=jnp.float32))  # the converted path
        assert trained.keys() == shipped.keys()
        for key, value in trained.items():  # float16 copies of the trained weights
            expected = np.asarray(value).astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(np.asarray(shipped[key]), expected, err_msg=key)
        if component == "unet":
            assert (out / repo / "scheduler" / "scheduler_config.json").is_file()
    for repo in ("show-1-base", "show-1-sr2"):
        assert (out / repo / "tokenizer").is_dir() and (out / repo / "text_encoder" / "config.json").is_file()
    info = json.loads((out / "show1_shapes.json").read_text())
    assert sorted(map(tuple, info["held_out"])) == sorted(map(tuple, demo.split().held_out))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 25 * 2**20  # what may ship in the repository
    assert (out / "generate.yaml").read_text() == demo.GENERATE_CONFIG.read_text()  # its settings travel with it
    assert demo.generate_config(out) == out / "generate.yaml"
    assert demo.generate_config(tmp_path) == demo.GENERATE_CONFIG
    weights = dict(o.split("=", 1) for o in demo.weight_overrides(out))
    assert weights["weights.first_frame"] == str((out / "IF-II-L").resolve())


def test_generate_defaults_to_the_shipped_model_only_without_weights(tmp_path, monkeypatch):
    chosen = {}

    class Stop(Exception):
        pass

    def fake_load(cls, config, overrides):
        chosen["config"], chosen["overrides"] = config, list(overrides)
        raise Stop

    monkeypatch.setattr("show1_jax.settings.load_settings", fake_load)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(demo, "DEFAULT_WEIGHTS", shipped)
    parser = cli.build_parser()
    with pytest.raises(Stop):
        cli.cmd_generate(parser.parse_args(["generate", "a red circle moving right", "--output", str(tmp_path / "o")]))
    assert chosen["config"] == str(demo.GENERATE_CONFIG)
    assert f"weights.base={shipped.resolve() / 'show-1-base'}" in chosen["overrides"]
    with pytest.raises(Stop):  # a weights folder given: the released settings, not the demo's
        cli.cmd_generate(parser.parse_args(["generate", "x", "--output", str(tmp_path / "o"), "--base", "b"]))
    assert chosen["config"].endswith("show1.yaml")
    shipped.rmdir()  # nothing shipped: the released settings as before
    with pytest.raises(Stop):
        cli.cmd_generate(parser.parse_args(["generate", "x", "--output", str(tmp_path / "o")]))
    assert chosen["config"].endswith("show1.yaml")


def _demo_settings(tmp_path):
    from show1_jax.generate_settings import GenerateSettings
    from show1_jax.settings import load_settings

    return load_settings(GenerateSettings, demo.GENERATE_CONFIG, demo.weight_overrides(tmp_path))


def test_real_stage_inputs_are_each_stage_input_and_score_full_marks(tmp_path):
    from show1_jax.stages import video_to_uint8

    settings = _demo_settings(tmp_path)
    combos = list(demo.split().held_out)[:6]
    drawn, inputs = demo.real_stage_inputs(combos, settings, seed=3)
    assert sorted(drawn) == sorted(combos)
    kf = settings.keyframes
    assert inputs["interpolation"].shape == (6, kf.num_frames, kf.height, kf.width, 3)
    assert inputs["sr1"].shape == (6, (kf.num_frames - 1) * 4 + 1, kf.height, kf.width, 3)
    assert inputs["sr2"].shape == (6, (kf.num_frames - 1) * 4 + 1, settings.sr1.height, settings.sr1.width, 3)
    np.testing.assert_array_equal(inputs["interpolation"], inputs["sr1"][:, ::4])
    for frames in inputs.values():
        assert frames.dtype == np.float32 and -1.0 <= frames.min() and frames.max() <= 1.0
        assert demo._score(list(zip(video_to_uint8(frames), drawn)))["overall"] == 1.0
    assert demo.real_stage_inputs(combos, settings, seed=4)[1]["sr1"].tobytes() != inputs["sr1"].tobytes()


def test_evaluate_real_inputs_feeds_each_stage_its_real_clips_with_their_prompts(tmp_path, monkeypatch):
    settings = _demo_settings(tmp_path)
    calls = []

    class EchoPipe:  # returns its input: real clips score 100%, a stage that loses nothing
        def run_stage(self, stage, frames, prompts, run):
            calls.append((stage, frames.shape, list(prompts), run.seed))
            return frames[:, :, :, ::-1] if stage == "sr2" else frames  # SR2 mirrors left-right: direction wrong

    monkeypatch.setattr(demo, "_pipeline", lambda weights, overrides: (settings, EchoPipe()))
    combos = list(demo.split().held_out)[:5]
    reports = demo.evaluate_real_inputs(tmp_path, combos, seeds=(0, 1), log=lambda m: None)
    assert [c[0] for c in calls] == ["interpolation", "sr1", "sr2"] * 2 and [c[3] for c in calls[::3]] == [0, 1]
    for seed in (0, 1):
        drawn, _ = demo.real_stage_inputs(combos, settings, seed=seed)
        assert calls[3 * seed][2] == [demo.caption_for(c, demo.DATASET.caption_template) for c in drawn]
    assert reports["interpolation"]["overall"] == reports["sr1"]["overall"] == 1.0
    assert reports["sr2"]["colour"] == reports["sr2"]["shape"] == 1.0
    horizontal = sum(c.direction in ("left", "right") for c in combos) / len(combos)
    assert reports["sr2"]["direction"] == pytest.approx(1.0 - horizontal)


def test_shapes_eval_prints_the_final_stage_floor_ceiling_and_per_stage_tables(tmp_path, monkeypatch, capsys):
    def report(overall):
        return {"colour": overall, "shape": overall, "direction": overall, "overall": overall}

    weights = tmp_path / "shapes"
    weights.mkdir()
    (weights / "show1_shapes.json").write_text("{}")
    seen = {}

    def stages(w, combos, *, seeds, overrides):
        seen["model"] = (Path(w), len(combos), list(seeds), list(overrides))
        return {"keyframes": report(0.9), "interpolation": report(0.8), "sr1": report(0.7), "sr2": report(0.6)}

    def floor(w, combos, *, seeds, overrides, stage):
        seen["floor_stage"] = stage
        return report(0.1)

    monkeypatch.setattr(demo, "evaluate_stages", stages)
    monkeypatch.setattr(demo, "evaluate", floor)
    monkeypatch.setattr(demo, "random_cascade", lambda root: root)
    monkeypatch.setattr(demo, "ceiling", lambda combos, n_per_combo, size: {**report(1.0), "size": size})
    monkeypatch.setattr(demo, "evaluate_real_inputs", lambda *a, **k: {"sr2": report(0.95)})
    out = tmp_path / "report.json"
    args = ["shapes", "eval", "sr2.steps=4", "--weights", str(weights), "--seeds", "0,2", "--report", str(out)]
    assert cli.main(args + ["--per-stage"]) == 0
    printed = capsys.readouterr().out
    assert seen["model"] == (weights, len(demo.split().held_out), [0, 2], ["sr2.steps=4"])
    assert seen["floor_stage"] == "sr2"
    assert "60.0%" in printed.splitlines()[2] and "10.0%" in printed and "100.0%" in printed
    assert "keyframes (prompts)" in printed and "95.0%" in printed.split("sr2 (real input)")[1].splitlines()[0]
    saved = json.loads(out.read_text())
    assert saved["model"]["overall"] == 0.6 and saved["real clips (ceiling)"]["size"] == [80, 128]
    assert saved["per stage, fed real clips"]["sr2"]["overall"] == 0.95
    assert cli.main(args + ["--no-floor"]) == 0
    assert "per stage" not in capsys.readouterr().out and "per stage, fed real clips" not in json.loads(out.read_text())

    def steering(w, pairs, *, seeds, overrides):
        seen["steering"] = (Path(w), pairs, list(seeds))
        return {"accuracy": 0.25, "distinct": 0.25}

    monkeypatch.setattr(demo, "keyframe_steering", steering)
    assert cli.main(args + ["--no-floor", "--steering"]) == 0
    assert "direction 25.0%, distinct motions per noise 25%" in capsys.readouterr().out
    pairs = seen["steering"][1]
    assert seen["steering"][::2] == (weights, [0, 2]) and pairs == sorted(set(pairs))
    assert set(pairs) == {(c.colour, c.shape) for c in demo.split().held_out}
    assert json.loads(out.read_text())["keyframe direction steering"] == {"accuracy": 0.25, "distinct": 0.25}
    assert cli.main(args + ["--no-floor", "--split", "validation"]) == 0
    assert seen["model"][1] == len(demo.validation_combinations())
    assert "19 validation prompts x 2 seeds" in capsys.readouterr().out


def test_direction_steering_tells_a_word_steered_model_from_a_noise_steered_one():
    from show1_jax.data.synthetic import SyntheticConfig, clip_specs, render_clip

    config = SyntheticConfig(height=20, width=32, num_frames=8, speed=1, colours=demo.DATASET.colours,
                             shapes=demo.DATASET.shapes)  # fmt: skip

    def clip(prompt: str, direction: str) -> np.ndarray:
        _, colour, shape, _, _ = prompt.split()
        combo = demo.Combination(colour, shape, direction)
        return render_clip(clip_specs(1, config, combinations=[combo], seed=0)[0], config)

    directions = demo.DATASET.directions
    pairs = [("red", "circle"), ("blue", "square")]
    steered = demo.direction_steering(lambda p, s: clip(p, p.split()[-1]), pairs, seeds=(0, 1))
    assert steered == {"accuracy": 1.0, "distinct": 1.0}
    by_noise = demo.direction_steering(lambda p, s: clip(p, directions[s % 4]), pairs, seeds=(0, 1, 2, 3))
    assert by_noise == {"accuracy": 1 / len(directions), "distinct": 1 / len(directions)}


def test_clip_sets_are_rendered_with_their_paths_and_grouped_by_direction(tmp_path):
    """clips_quad prepares clips_c0 (every path fixed by its direction) and lists it in runs of the four directions
    of one colour and shape (held-out triples filled from another colour), by relative paths to existing files."""
    logs = []
    quad = demo.prepare_clip_set(tmp_path, "clips_quad", num_clips=80, log=logs.append)
    assert len(logs) == 2 and quad == tmp_path / "clips_quad"
    from show1_jax.data.synthetic import read_metadata

    records = read_metadata(tmp_path / "clips_c0")
    assert len(records) == 80 and {r["speed"] for r in records} == {1}
    for r in records:  # the middle frame's centre is the frame's centre: the path depends on the direction only
        (dy, dx), half = DIRECTIONS[r["direction"]], 1 * (demo.DATASET.num_frames - 1) / 2
        assert (r["center_y"], r["center_x"]) == (40 - dy * half, 64 - dx * half)
    with open(quad / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = {(r["colour"], r["shape"]) for r in records}
    assert len(rows) == 4 * 16 * len(pairs)
    held_out = set(demo.split().held_out)
    for start in range(0, len(rows), 4):
        group = rows[start : start + 4]
        assert [r["direction"] for r in group] == list(DIRECTIONS)
        assert all((quad / r["video_path"]).is_file() for r in group)
        assert all(r["caption"] == f"a {r['colour']} {r['shape']} moving {r['direction']}" for r in group)
        assert all((r["colour"], r["shape"], r["direction"]) not in held_out for r in group)
        assert len({r["shape"] for r in group}) == 1
    assert demo.prepare_clip_set(tmp_path, "clips_quad", log=logs.append) == quad and len(logs) == 2  # kept
    with pytest.raises(ValueError, match="unknown clip set `clips_x`"):
        demo.prepare_clip_set(tmp_path, "clips_x")


def test_spliced_captions_swap_only_the_direction_tokens(tmp_path):
    from show1_jax.data import load_caption_embeddings
    from show1_jax.data.synthetic import caption_for
    from show1_jax.text import TextEncoder

    encoder_dir = demo.write_text_encoders(tmp_path / "text")["t5"]
    encoder = TextEncoder(encoder_dir)
    tokenizer = encoder.tokenizer
    assert demo.direction_token_count(tokenizer, "a red circle moving up", "up") == 1  # "▁up"
    assert demo.direction_token_count(tokenizer, "a red circle moving left", "left") == 4  # "▁", "le", "f", "t"
    with pytest.raises(ValueError, match="does not end with its direction"):
        demo.direction_token_count(tokenizer, "a red circle moving up", "left")
    # A source set: 64 rows of training triples (the videos are not read), in a folder beside the output.
    train = demo.split().train
    source = tmp_path / "groups"
    source.mkdir()
    rows = [(f"videos/{i:03d}.mp4", train[i % len(train)]) for i in range(64)]
    with open(source / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_path", "caption", "colour", "shape", "direction"])
        for path, c in rows:
            writer.writerow([path, caption_for(c, demo.DATASET.caption_template), c.colour, c.shape, c.direction])
    out = tmp_path / "spliced"
    demo.write_spliced_captions(source, out, encoder_dir, probability=0.5, seed=3)
    with open(out / "captions.csv", newline="") as f:
        written = list(csv.DictReader(f))
    table = load_caption_embeddings(out / "embeddings.npz")
    assert [(r["colour"], r["shape"], r["direction"]) for r in written] == [tuple(c) for _, c in rows]  # order kept
    assert all((out / r["video_path"]).resolve() == (source / p).resolve() for r, (p, _) in zip(written, rows))
    spliced = [r for r in written if " | " in r["caption"]]
    assert 16 <= len(spliced) <= 48 and set(table) == {r["caption"] for r in spliced}
    for row in spliced:
        own, donor = row["caption"].split(" | ")
        assert own == caption_for(demo.Combination(row["colour"], row["shape"], row["direction"]))
        assert donor.endswith(" " + row["direction"]) and not donor.startswith(own.rsplit(" ", 1)[0] + " ")
        e_own, e_donor = encoder.encode([own, donor])
        n = demo.direction_token_count(tokenizer, own, row["direction"])
        length_own = int(np.sum(encoder.tokenize(own).attention_mask))
        length_donor = int(np.sum(encoder.tokenize(donor).attention_mask))
        changed = np.nonzero(np.abs(table[row["caption"]] - e_own).max(axis=1) > 1e-6)[0]
        assert list(changed) == list(range(length_own - 1 - n, length_own - 1))
        np.testing.assert_allclose(
            table[row["caption"]][changed], e_donor[length_donor - 1 - n : length_donor - 1], atol=1e-6
        )
    # The recipe hands the table to the run that trains on the set.
    settings = demo.stage_settings("keyframes_splice", tmp_path)
    assert settings.data.embeddings == str(tmp_path / "clips_splice" / "embeddings.npz")
    assert settings.data.batch_group_size == 4
