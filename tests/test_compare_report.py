"""The report of `minsnr compare` built from run folders: per-seed curves, readings against the same seed's
reference, the summary over seeds, the tables, compare.json and compare.png; run names and matrices."""

import json
from pathlib import Path

import numpy as np
import pytest

from minsnr.compare import report, verdict
from minsnr.compare.presets import RunSpec, Settings, run_config, run_folder, run_matrix, seed_values
from minsnr.compare.worker import STATUS
from minsnr.config import PACKAGED_CONFIGS, ConfigError, load_config

CPU = PACKAGED_CONFIGS / "compare" / "cpu.yaml"
STEPS = list(range(100, 1201, 100))


def write_run(
    root: Path, seed: int, name: str, steps: list[int], values: list[float], state: str, step: int | None
) -> None:
    folder = run_folder(root, seed, name)
    folder.mkdir(parents=True)
    lines = [
        json.dumps({"step": s, "loss": 0.1}) + "\n" + json.dumps({"step": s, "fid_cls": v, "cls_acc": 0.5})
        for s, v in zip(steps, values)
    ]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / STATUS).write_text(json.dumps({"state": state, "step": step, "message": ""}))


def falling(speed: float, wobble: float) -> list[float]:
    """A score falling from ~300 to ~10 over 1,200 steps, `speed` times as fast, with a small wobble."""
    s = np.array(STEPS, dtype=float) * speed
    return list(8 + 300 / (1 + s / 150) ** 1.5 * (1 + wobble * np.cos(np.arange(len(s)))))


def test_report_over_seeds_from_run_folders(tmp_path):
    specs = run_matrix(Settings(targets=["x0", "eps"]), 5.0)
    assert [s.name for s in specs] == ["x0_const", "x0_min_snr", "eps_snr", "eps_min_snr"]
    for seed, wobble in zip((0, 1, 2), (0.02, -0.03, 0.01)):
        write_run(tmp_path, seed, "x0_const", STEPS, falling(1.0, wobble), "finished", 1200)
        write_run(tmp_path, seed, "x0_min_snr", STEPS, falling(2.0, -wobble), "finished", 1200)
        write_run(tmp_path, seed, "eps_min_snr", STEPS, falling(1.0, wobble), "finished", 1200)
    write_run(tmp_path, 0, "eps_snr", STEPS[:5], falling(1.0, 0.0)[:5], "diverged", 550)
    write_run(tmp_path, 1, "eps_snr", STEPS, falling(1.0, 0.01)[:-1] + [float("nan")], "finished", 1200)
    # seed 2 of eps_snr has not started: its pair is left out of the summary
    result = report.build(tmp_path, specs, [0, 1, 2], {"steps": 1200, "eval_every": 100}, "fid_cls")
    runs = {r["name"]: r for r in result["runs"]}
    x0 = runs["x0_min_snr"]["race"]
    assert x0["paired_seeds"] == [0, 1, 2]
    assert x0["levels"]["half"]["geomean"] == pytest.approx(2.0, rel=0.15)
    assert x0["levels"]["half"]["verdict"] == "faster" and x0["headline"]["verdict"] == "faster"
    # the reference reaches its quarter level at step 300, the run before its second evaluation: a bound
    assert x0["levels"]["quarter"]["bounds"] == [">="] * 3 and x0["levels"]["quarter"]["geomean"] == pytest.approx(1.5)
    eps = runs["eps_min_snr"]["race"]
    assert eps["paired_seeds"] == [0, 1] and "2 of 3 seeds done" in runs["eps_min_snr"]["note"]
    assert "reference diverged in seed(s) 0" in runs["eps_min_snr"]["note"]
    assert runs["eps_snr"]["seeds"][1]["dropped"] == 1 and runs["eps_snr"]["seeds"][2]["status"] == "not started"
    assert runs["x0_const"]["race"] is None  # the reference is not raced against itself
    text = report.table(result)
    assert "3 finished" in text and "1 diverged at 550, 1 finished, 1 not started" in text
    assert "seed0" in text and "seed2" in text and "faster (at ref" in text
    json.dumps(result)  # the report goes into compare.json as is
    report.plot(result, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_run_names_seeds_and_folders(tmp_path):
    specs = run_matrix(Settings(targets=["v"], weightings=["baseline", "min_snr", "min_snr:3", "plain"]), None)
    assert [(s.name, s.gamma) for s in specs] == [("v_plain", None), ("v_min_snr", 5.0), ("v_min_snr_g3", 3.0)]
    base = load_config(CPU, [f"run_dir={tmp_path}", "train.seed=7"])
    assert seed_values(base, 3) == [7, 8, 9]
    cfg = run_config(base, specs[1], tmp_path, None, 1, seed=8, metric="bpd")
    assert cfg.run_dir == str(tmp_path / "seed8" / "v_min_snr") and cfg.train.seed == 8
    assert cfg.log.eval_metric == "bpd" and cfg.loss.target == "v" and cfg.loss.gamma == 5.0


def test_timestep_distributions_and_a_chosen_reference(tmp_path):
    settings = Settings(
        targets=["eps"], weightings=["min_snr:1", "const@logit_normal", "min_snr@importance"], reference="min_snr"
    )
    specs = run_matrix(settings, None)
    assert [(s.name, s.timesteps, s.reference) for s in specs] == [
        ("eps_min_snr", None, True),
        ("eps_min_snr_g1", None, False),  # the reference is added first
        ("eps_const@logit_normal", "logit_normal", False),
        ("eps_min_snr@importance", "importance", False),
    ]
    base = load_config(CPU, [f"run_dir={tmp_path}"])
    cfgs = {s.name: run_config(base, s, tmp_path, None, 1) for s in specs}
    assert cfgs["eps_const@logit_normal"].loss.timesteps == "logit_normal"
    assert cfgs["eps_min_snr"].loss.timesteps == base.loss.timesteps == "uniform"
    for name, speed in [
        ("eps_min_snr", 1.0),
        ("eps_min_snr_g1", 1.5),
        ("eps_const@logit_normal", 0.2),
        ("eps_min_snr@importance", 1.0),
    ]:
        write_run(tmp_path, 0, name, STEPS, falling(speed, 0.0), "finished", 1200)
    result = report.build(tmp_path, specs, [0], {"steps": 1200, "eval_every": 100}, "fid_cls")
    runs = {r["name"]: r for r in result["runs"]}
    assert "one seed: no verdict (--seeds 3)" in report.table(result)
    assert runs["eps_min_snr_g1"]["race"]["levels"]["half"]["geomean"] == pytest.approx(1.5, rel=0.1)
    assert runs["eps_min_snr@importance"]["race"]["levels"]["half"]["geomean"] == pytest.approx(1.0)
    slow = runs["eps_const@logit_normal"]["race"]["seeds"][0]["end"]
    assert slow["bound"] == "<" and slow["step"] is None  # censored: never reaches the reference's end
    assert runs["eps_min_snr_g1"]["race"]["headline"]["verdict"] == "one seed"
    with pytest.raises(ConfigError, match="lognormal, logit_normal"):
        run_matrix(Settings(targets=["x0"], weightings=["const@lognorm"]), None)


def test_stateful_weightings_race_but_not_with_importance_sampling():
    specs = run_matrix(
        Settings(targets=["x0"], weightings=["learned", "pareto@logit_normal"], reference="min_snr"), 5.0
    )
    assert [(s.name, s.gamma) for s in specs] == [
        ("x0_min_snr", 5.0),
        ("x0_learned", None),
        ("x0_pareto@logit_normal", None),
    ]
    with pytest.raises(ConfigError, match="needs a fixed weight"):
        run_matrix(Settings(targets=["x0"], weightings=["learned@importance"]), None)


def test_spec_name_keeps_gamma_and_timesteps_apart():
    assert (
        RunSpec("eps", "min_snr", 3.0, explicit_gamma=True, timesteps="importance").name == "eps_min_snr_g3@importance"
    )


def test_a_summary_cell_says_what_it_is():
    def level(geomean, low, high, bounds, verdict="faster"):
        return {"geomean": geomean, "low": low, "high": high, "bounds": bounds, "verdict": verdict}

    assert verdict.summary_text(level(1.62, 1.31, 2.01, [None] * 3)) == "1.62x [1.31, 2.01]"
    assert verdict.summary_text(level(1.5, None, None, [">="], "one seed")) == ">=1.50x"
    # every seed censored at the same bound: no interval to show, and not informative
    assert verdict.summary_text(level(1.0, 1.0, 1.0, ["<"] * 3, "within noise")) == "~<1.00x"
    assert verdict.summary_text(level(0.9, 0.7, 1.2, ["<", None, None], "within noise")) == "~0.90x [0.70, 1.20]"
