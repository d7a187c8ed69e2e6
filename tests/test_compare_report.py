"""Speed-up arithmetic of `minsnr compare` on hand-made curves, and the report built from run folders."""

import json
from pathlib import Path

import numpy as np
import pytest

from minsnr.compare import report
from minsnr.compare.presets import CONFIGS, RunSpec, Settings, run_config, run_matrix
from minsnr.compare.worker import STATUS
from minsnr.config import ConfigError, load_config

CPU = CONFIGS / "compare" / "cpu.yaml"

STEPS = np.array([100.0, 200.0, 300.0, 400.0])
BASE = (STEPS, np.array([50.0, 30.0, 20.0, 25.0]))  # best 20, first reached at step 300


def test_crossing_between_evaluations_is_interpolated():
    run = (STEPS, np.array([40.0, 25.0, 15.0, 10.0]))
    s = report.speedup(BASE, run)
    # 20 is crossed between (200, 25) and (300, 15): 200 + (25 - 20) / (25 - 15) * 100 = 250
    assert s["threshold"] == 20 and s["baseline_step"] == 300
    assert s["step"] == pytest.approx(250) and s["speedup"] == pytest.approx(300 / 250)


def test_reached_at_an_evaluation_and_already_at_the_first():
    assert report.speedup(BASE, (STEPS, np.array([30.0, 20.0, 19.0, 18.0])))["speedup"] == pytest.approx(1.5)
    assert report.speedup(BASE, (STEPS, np.array([10.0, 9.0, 8.0, 7.0])))["speedup"] == pytest.approx(3.0)


def test_equal_curves_give_one():
    s = report.speedup(BASE, BASE)
    assert s["speedup"] == 1.0 and s["step"] == 300


def test_never_reached_gives_only_a_bound():
    s = report.speedup(BASE, (STEPS, np.array([60.0, 40.0, 30.0, 21.0])))
    assert s["step"] is None and s["speedup"] is None
    assert s["below"] == pytest.approx(300 / 400)  # it would need more than its 400 steps
    s = report.speedup(BASE, (STEPS[:2], np.array([60.0, 40.0])), run_diverged=True)
    assert s["speedup"] is None and s["below"] is None  # a diverged run never gets there


def test_baseline_diverged_is_scored_by_its_best_before_and_without_evaluations_gives_nothing():
    diverged = (np.array([100.0, 200.0]), np.array([50.0, 30.0]))
    s = report.speedup(diverged, (STEPS, np.array([40.0, 20.0, 10.0, 5.0])))
    assert s["threshold"] == 30 and s["baseline_step"] == 200
    assert s["step"] == pytest.approx(150) and s["speedup"] == pytest.approx(200 / 150)
    s = report.speedup((np.zeros(0), np.zeros(0)), (STEPS, np.array([40.0, 20.0, 10.0, 5.0])))
    assert s["speedup"] is None and s["threshold"] is None


def write_run(root: Path, name: str, steps: list[int], values: list[float], state: str, step: int | None) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 0.1}) + "\n" + json.dumps({"step": s, "fid_cls": v, "cls_acc": 0.5})
             for s, v in zip(steps, values)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / STATUS).write_text(json.dumps({"state": state, "step": step, "message": ""}))


def test_report_from_run_folders(tmp_path):
    specs = run_matrix(Settings(targets=["x0", "eps"]), 5.0)
    assert [s.name for s in specs] == ["x0_const", "x0_min_snr", "eps_snr", "eps_min_snr"]
    write_run(tmp_path, "x0_const", [100, 200, 300, 400], [50, 30, 20, 25], "finished", 400)
    write_run(tmp_path, "x0_min_snr", [100, 200, 300, 400], [40, 25, 15, float("nan")], "finished", 400)
    write_run(tmp_path, "eps_snr", [100, 200], [50, 30], "diverged", 250)
    write_run(tmp_path, "eps_min_snr", [100, 200, 300, 400], [40, 20, 10, 5], "finished", 400)
    state = {"steps": 400, "eval_every": 100}
    result = report.build(tmp_path, specs, state, "fid_cls")
    runs = {r["name"]: r for r in result["runs"]}
    assert runs["x0_min_snr"]["speed"]["speedup"] == pytest.approx(300 / 250)
    assert runs["x0_min_snr"]["steps"] == [100, 200, 300] and "1 non-finite" in runs["x0_min_snr"]["note"]
    assert runs["eps_snr"]["status"] == "diverged" and runs["eps_snr"]["status_step"] == 250
    assert runs["eps_min_snr"]["speed"]["speedup"] == pytest.approx(200 / 150)
    assert "reference diverged at step 250" in runs["eps_min_snr"]["note"]
    text = report.table(result)
    assert "diverged at 250" in text and "1.20x" in text and "1.33x" in text
    json.dumps(result)  # the report goes into compare.json as is
    report.plot(result, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_run_names_and_baselines():
    specs = run_matrix(Settings(targets=["v"], weightings=["baseline", "min_snr", "min_snr:3", "plain"]), None)
    assert [(s.name, s.gamma, s.is_baseline) for s in specs] == [
        ("v_plain", None, True), ("v_min_snr", 5.0, False), ("v_min_snr_g3", 3.0, False)]
    assert RunSpec("eps", "snr", None).is_baseline and not RunSpec("eps", "const", None).is_baseline


def test_timestep_distributions_and_a_chosen_reference(tmp_path):
    settings = Settings(targets=["eps"], weightings=["min_snr:1", "const@logit_normal", "min_snr@importance"],
                        reference="min_snr")
    specs = run_matrix(settings, None)
    assert [(s.name, s.timesteps, s.reference) for s in specs] == [
        ("eps_min_snr", None, True), ("eps_min_snr_g1", None, False),  # the reference is added first
        ("eps_const@logit_normal", "logit_normal", False), ("eps_min_snr@importance", "importance", False)]
    base = load_config(CPU, [f"run_dir={tmp_path}"])
    cfgs = {s.name: run_config(base, s, tmp_path, None, 1) for s in specs}
    assert cfgs["eps_const@logit_normal"].loss.timesteps == "logit_normal"
    assert cfgs["eps_min_snr"].loss.timesteps == base.loss.timesteps == "uniform"
    for name, values in [("eps_min_snr", [40, 30, 20]), ("eps_min_snr_g1", [30, 20, 10]),
                         ("eps_const@logit_normal", [50, 45, 40]), ("eps_min_snr@importance", [40, 30, 20])]:
        write_run(tmp_path, name, [100, 200, 300], values, "finished", 300)
    runs = {r["name"]: r for r in report.build(tmp_path, specs, {"steps": 300, "eval_every": 100}, "fid_cls")["runs"]}
    assert runs["eps_min_snr_g1"]["speed"]["speedup"] == pytest.approx(300 / 200)  # reaches 20 at step 200
    assert runs["eps_min_snr@importance"]["speed"]["speedup"] == pytest.approx(1.0)
    assert runs["eps_const@logit_normal"]["speed"]["speedup"] is None
    assert runs["eps_const@logit_normal"]["speed"]["below"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="lognormal, logit_normal"):
        run_matrix(Settings(targets=["x0"], weightings=["const@lognorm"]), None)


def test_stateful_weightings_race_but_not_with_importance_sampling():
    specs = run_matrix(Settings(targets=["x0"], weightings=["learned", "pareto@logit_normal"], reference="min_snr"), 5.0)
    assert [(s.name, s.gamma) for s in specs] == [("x0_min_snr", 5.0), ("x0_learned", None),
                                                  ("x0_pareto@logit_normal", None)]
    with pytest.raises(ConfigError, match="needs a fixed weight"):
        run_matrix(Settings(targets=["x0"], weightings=["learned@importance"]), None)
