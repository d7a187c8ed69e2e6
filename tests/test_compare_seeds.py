"""`minsnr compare` over seeds and scores: --seeds grows and shrinks without retraining, the score's sanity
is measured and stored, an unlabelled folder races on bits/dim, the auto classifier sees the resized images
the runs see, and bad settings stop before training with one line."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minsnr.checkpoint as ck
from minsnr.compare import cli
from minsnr.compare.classifier import labelled_images
from minsnr.compare.presets import Settings, check_base, run_folder
from minsnr.compare.sanity import warnings
from minsnr.config import PACKAGED_CONFIGS, ConfigError, load_config
from minsnr.evaluate.classifier import load_labelled

CPU = PACKAGED_CONFIGS / "compare" / "cpu.yaml"
TINY = [
    "model.args={patch_size: 2, depth: 1, width: 16, num_heads: 2}",
    "train.batch_size=8",
    "log.every=2",
    "log.eval_num=20",
    "log.preview_every=0",
    "checkpoint.every=4",
    "optim.warmup_steps=2",
    "ema.decay=0.9",
    "sample.steps=2",
    "train.steps=4",
    "log.eval_every=2",
]


def args(run_dir: Path, *more: str) -> list[str]:
    return [
        str(CPU),
        *TINY,
        f"run_dir={run_dir}",
        "--targets",
        "x0",
        "--jobs",
        "2",
        "--bin-images",
        "20",
        "--classifier-epochs",
        "1",
        *more,
    ]


def test_seeds_grow_and_shrink_without_retraining_and_the_score_is_checked(tmp_path, capsys):
    assert cli.main(args(tmp_path, "--seeds", "2")) == 0
    out = capsys.readouterr().out
    assert out.count("started  seed0/") == 2 and out.count("started  seed1/") == 2
    a0, a1 = (ck.load_checkpoint(run_folder(tmp_path, s, "x0_const") / "checkpoints" / "latest.pt") for s in (0, 1))
    assert a0["config"]["train"]["seed"] == 0 and a1["config"]["train"]["seed"] == 1
    assert any(not np.array_equal(a0["model"][k], a1["model"][k]) for k in a0["model"])  # seeds differ
    state = json.loads((tmp_path / "compare.json").read_text())
    sanity = state["sanity"]
    assert sanity["floor"] < sanity["ceiling"]  # real images score better than an untrained model
    assert len(sanity["noise"]["scores"]) == 4 and sanity["noise"]["step"] == 4 and sanity["noise"]["sd_log"] > 0
    assert sanity["classifier"]["num_classes"] == 10
    race = state["report"]["runs"][1]["race"]
    assert race["paired_seeds"] == [0, 1] and set(race["levels"]) == {"quarter", "half", "end"}

    assert cli.main(args(tmp_path, "--seeds", "3")) == 0  # grows: seeds 0 and 1 are reused
    out = capsys.readouterr().out
    assert "started  seed0/" not in out and "started  seed1/" not in out and out.count("started  seed2/") == 2
    assert "seed1/x0_min_snr: finished earlier, reused" in out
    assert json.loads((tmp_path / "compare.json").read_text())["report"]["seeds"] == [0, 1, 2]

    assert cli.main(args(tmp_path, "--seeds", "1")) == 0  # shrinks: reports on seed 0, deletes nothing
    out = capsys.readouterr().out
    assert "first 1 of the 3 seeds" in out and "started" not in out
    assert run_folder(tmp_path, 2, "x0_const").is_dir()
    assert json.loads((tmp_path / "compare.json").read_text())["report"]["seeds"] == [0]
    assert cli.main(args(tmp_path, "--report-only")) == 0  # without --seeds: all three
    assert json.loads((tmp_path / "compare.json").read_text())["report"]["seeds"] == [0, 1, 2]


def _digit_folder(root: Path, count: int = 120) -> Path:
    x, _, _, _ = load_labelled("digits")
    root.mkdir()
    for i in range(count):
        Image.fromarray(x[i, :, :, 0]).save(root / f"{i:04d}.png")
    return root


def test_an_unlabelled_folder_races_on_bits_per_dimension(tmp_path, capsys):
    folder = _digit_folder(tmp_path / "images")
    data = ["data.source=folder", f"data.path={folder}", "model.num_classes=0", "loss.label_dropout=0"]
    assert cli.main([*args(tmp_path / "race"), *data]) == 0
    out = capsys.readouterr().out
    assert "has no labels: racing on bits/dim" in out and "bpd every 2 steps" in out
    state = json.loads((tmp_path / "race" / "compare.json").read_text())
    assert state["metric"] == "bpd" and state["sanity"]["floor"] is None and state["sanity"]["ceiling"] > 0
    curve = state["report"]["runs"][0]["seeds"][0]
    assert curve["steps"] == [2.0, 4.0] and all(v > 0 for v in curve["values"])
    assert cli.main([*args(tmp_path / "race2"), *data, "--metric", "fid_cls"]) == 2
    assert "has none: use --metric bpd" in capsys.readouterr().err


def test_auto_classifier_sees_the_images_the_runs_see():
    base = load_config(CPU)
    x, y, x_test, y_test = labelled_images(base)
    ref = load_labelled("digits")  # what earlier versions trained on: the same arrays at the native size
    for a, b in zip((x, y, x_test, y_test), ref):
        np.testing.assert_array_equal(a, b)
    x16, _, t16, _ = labelled_images(load_config(CPU, ["data.resolution=16", "model.input_size=16"]))
    assert x16.shape[1:] == (16, 16, 1) and t16.shape == (180, 16, 16, 1)


def test_bad_settings_stop_before_training_with_one_line(tmp_path, capsys):
    assert cli.main(args(tmp_path, "--seeds", "-1")) == 2
    assert "--seeds -1: give at least 1" in capsys.readouterr().err
    assert cli.main(args(tmp_path, "--metric", "psnr")) == 2
    assert "--metric 'psnr' is not valid; choose one of: auto, fid_cls, fid, bpd" in capsys.readouterr().err
    clf = tmp_path / "clf"
    clf.with_suffix(".safetensors").write_bytes(b"")
    clf.with_suffix(".json").write_text(json.dumps({"image_shape": [28, 28, 1]}))
    assert cli.main(args(tmp_path, "--classifier", str(clf))) == 2
    err = capsys.readouterr().err
    assert "takes images [28, 28, 1]" in err and "--classifier auto" in err
    assert not list(tmp_path.glob("seed*"))  # nothing trained


def test_an_evaluation_interval_off_the_logging_grid_lowers_log_every_and_says_so():
    base = load_config(CPU, ["log.every=100", "log.eval_every=150"])
    fitted, notes = check_base(base)
    assert fitted.log.every == 50 and fitted.log.eval_every == 150
    assert len(notes) == 1 and "log.every=100 -> 50" in notes[0]
    with pytest.raises(ConfigError, match="log.eval_every must be > 0"):
        check_base(load_config(CPU, ["log.eval_every=0"]))


def test_warnings_name_a_weak_classifier_a_noisy_score_and_an_early_curve_as_good_as_its_end():
    sanity = {
        "classifier": {"num_classes": 2, "test_accuracy": 0.85},
        "floor": 10.0,
        "ceiling": 20.0,
        "noise": {"sd_log": 0.3},
    }
    steps = [250.0 * k for k in range(1, 13)]
    good = {"seed": 0, "steps": steps, "values": list(np.linspace(300, 10, 12))}
    early = {"seed": 1, "steps": steps, "values": [200, 17.0, *np.linspace(60, 18, 10)]}
    found = warnings(sanity, [{"name": "x0_min_snr", "seeds": [good, early]}], 3000)
    assert any("only 2 classes" in w for w in found) and any("only 85%" in w for w in found)
    assert any("barely separates" in w for w in found) and any("30% apart" in w for w in found)
    assert [w for w in found if "step 500 (17)" in w] and not [w for w in found if w.startswith("seed0/")]
    assert warnings({}, [{"name": "x", "seeds": [good]}], 3000) == []


def test_settings_default_to_one_seed_for_a_new_comparison():
    from minsnr.compare.runner import seed_count

    assert seed_count(Settings(), None) == 1 and seed_count(Settings(), {"seeds": 3}) == 3
    assert seed_count(Settings(seeds=2), {"seeds": 3}) == 2


def test_few_evaluations_are_named_and_their_noise_still_estimated():
    from minsnr.compare import verdict

    steps = [100.0, 200.0, 300.0]
    found = warnings(
        {}, [{"name": "x0_min_snr", "seeds": [{"seed": 0, "steps": steps, "values": [3.0, 2.0, 1.5]}]}], 300
    )
    assert any("only 3 evaluations per run" in w and "--eval-every" in w for w in found)
    # three evaluations: the whole curve's second difference (the half alone has too few)
    y = np.log([3.0, 2.0, 1.5])
    assert verdict.plateau_noise([y]) == pytest.approx(abs(y[0] - 2 * y[1] + y[2]) / np.sqrt(6))
    assert verdict.plateau_noise([y[:2]]) == 0.0
