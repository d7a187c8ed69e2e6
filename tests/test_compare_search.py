"""`minsnr compare --search`: the candidate grid, the twins dropped before training, the halving plan
against its budget, the ranking, and a tiny search end to end (a run continued across rounds equals a run
trained straight to the same step; a rerun trains nothing; a changed budget is refused)."""

import json
import math

import numpy as np
import pytest
import torch
from test_compare_runs import CPU, TINY

from minsnr.compare import cli
from minsnr.compare.presets import parse_weighting, run_folder
from minsnr.compare.search import candidate_tokens, distinct, parse_budget, plan, rank, token
from minsnr.config import ConfigError, load_config
from minsnr.timesteps import SEARCH_VARIANTS, TIMESTEPS
from minsnr.weighting import ADAPTIVE, STRATEGIES


def test_budget_text():
    assert parse_budget("60000") == 60000 and parse_budget("60k") == 60000 and parse_budget("1.5M") == 1_500_000
    for bad in ("lots", "0", "-5k"):
        with pytest.raises(ConfigError, match="--search"):
            parse_budget(bad)


def test_default_candidates_cross_every_weighting_grid_with_every_timestep_law():
    tokens = candidate_tokens(None, None)
    heads = sum(max(1, len(w.grid)) for w in STRATEGIES.values()) + len(ADAPTIVE)
    laws = len(TIMESTEPS) + len(SEARCH_VARIANTS)
    importance = [n for n, d in TIMESTEPS.items() if d.same_objective]
    assert len(tokens) == heads * laws - len(ADAPTIVE) * len(importance)  # no stateful weight to sample t from
    assert len(set(tokens)) == len(tokens)
    assert "min_snr:2@laplace" in tokens and "learned@importance" not in tokens and "p2:0.5" in tokens
    assert candidate_tokens(["min_snr:3", "debiased"], ["uniform", "lognormal(-0.4,1)"]) == [
        "min_snr:3",
        "debiased",
        "min_snr:3@lognormal(-0.4,1)",
        "debiased@lognormal(-0.4,1)",
    ]


def test_a_candidate_with_the_same_loss_as_another_is_dropped_before_training():
    base = load_config(CPU)
    ref = parse_weighting("min_snr", "eps", 5.0)
    specs = [parse_weighting(t, "eps", None) for t in ("p2:1", "sigmoid:0", "soft_min_snr:1", "min_snr:5", "p2:0.5")]
    kept, same = distinct(specs, base, ref)
    assert [s.name for s in kept] == ["eps_p2_g1", "eps_p2_g0.5"]
    assert same == {"eps_sigmoid_g0": "eps_p2_g1", "eps_soft_min_snr_g1": "eps_p2_g1", "eps_min_snr_g5": "eps_min_snr"}
    # for x0 the plain x0 MSE is const; importance sampling of const is uniform sampling of const
    x0 = [parse_weighting(t, "x0", None) for t in ("const", "plain", "const@importance", "learned")]
    kept, same = distinct(x0, base, parse_weighting("min_snr", "x0", 5.0))
    assert [s.name for s in kept] == ["x0_const", "x0_learned"]
    assert same == {"x0_plain": "x0_const", "x0_const@importance": "x0_const"}
    for spec in specs + x0:
        assert parse_weighting(token(spec), spec.target, None) == spec  # the token names the run again


@pytest.mark.parametrize(
    ("count", "budget", "finalists"), [(12, 100_000, 2), (5, 20_000, 1), (2, 3_000, 2), (40, 10**6, 3)]
)
def test_the_plan_halves_to_the_finalists_and_stays_within_the_budget(count, budget, finalists):
    p = plan(count, budget, finalists, log_every=50, max_steps=10**9)
    keep, horizons = p["keep"], p["horizons"]
    assert keep[0] == count and keep[-1] == min(count, finalists)
    assert all(b == max(finalists, math.ceil(a / 2)) for a, b in zip(keep, keep[1:]))
    assert all(b == 2 * a for a, b in zip(horizons, horizons[1:])) and horizons[0] % 200 == 0
    cost = sum((keep[r] + 1) * (horizons[r] - (horizons[r - 1] if r else 0)) for r in range(len(horizons)))
    assert cost == p["cost"] <= budget
    doubled = plan(count, budget, finalists, 50, 10**9)
    assert doubled == p
    assert p["cost"] + sum((keep[r] + 1) * 2**r for r in range(len(horizons))) * 200 > budget  # largest first horizon


def test_a_budget_too_small_names_what_it_needs_and_the_last_horizon_fits_the_run():
    with pytest.raises(ConfigError, match=r"12 candidates need at least 8,000 training steps"):
        plan(12, 3000, 1, log_every=50, max_steps=10**9)
    with pytest.raises(ConfigError, match=r"43 candidates need 5 halving rounds .* would pass train.steps=3000"):
        plan(43, 10**9, 2, log_every=50, max_steps=3000)
    p = plan(4, 10**9, 1, log_every=50, max_steps=3000)
    assert p["horizons"][-1] <= 3000 and p["horizons"] == [1400, 2800]


def test_ranking_puts_reaching_the_references_score_before_a_fast_start():
    steps = np.arange(1, 21, dtype=np.float64) * 50
    ref = {"steps": steps.tolist(), "values": (100 / steps).tolist(), "status": "finished"}
    fast_start = np.maximum(100 / (3 * steps), 0.15)  # 3x faster early, then stuck above the ref's end score 0.1
    runs = {
        "twice": {"steps": steps.tolist(), "values": (100 / (2 * steps)).tolist(), "status": "finished"},
        "half": {"steps": steps.tolist(), "values": (100 / (0.5 * steps)).tolist(), "status": "finished"},
        "same": {**ref},
        "plateau": {"steps": steps.tolist(), "values": fast_start.tolist(), "status": "finished"},
        "gone": {"steps": steps[:3].tolist(), "values": [500.0, 500.0, 500.0], "status": "diverged"},
    }
    runs["stuck_high"] = {"steps": steps.tolist(), "values": [900.0] * 20, "status": "finished"}
    runs["stuck_low"] = {"steps": steps.tolist(), "values": [600.0] * 20, "status": "finished"}
    ranking = rank(runs, ref, 1000)
    # two runs that reach no level are ordered by their smoothed score at the horizon, not by name
    assert [r["name"] for r in ranking] == ["twice", "same", "plateau", "half", "stuck_low", "stuck_high", "gone"]
    ranking = [r for r in ranking if not r["name"].startswith("stuck")]
    # "half" reaches the reference's mid-run score only at the horizon itself, where the smoothed end (a mean
    # with its neighbour) still lies above it: it is ranked at the quarter level
    assert [r["depth"] for r in ranking] == ["end", "end", "half", "quarter", None]
    assert ranking[0]["score"] == pytest.approx(2.0, rel=0.05) and ranking[1]["score"] == pytest.approx(1.0)
    assert ranking[2]["score"] == pytest.approx(3.0, rel=0.1)  # fast to the half level, never to the end one
    assert ranking[3]["score"] == pytest.approx(0.5, rel=0.05) and ranking[4]["score"] == 0.0


def _args(run_dir, classifier_path, budget="112"):
    return [
        str(CPU),
        *TINY,
        "log.every=2",
        f"run_dir={run_dir}",
        "train.steps=32",
        "--targets",
        "x0",
        "--classifier",
        classifier_path,
        "--jobs",
        "2",
        "--bin-images",
        "20",
        "--search",
        budget,
        "--weightings",
        "p2:0.5,debiased,edm:0.5",
        "--timesteps",
        "uniform",
        "--finalists",
        "1",
    ]


def test_a_tiny_search_end_to_end(tmp_path, classifier, capsys):
    assert cli.main(_args(tmp_path, classifier)) == 0
    state = json.loads((tmp_path / "search.json").read_text())
    t = state["targets"]["x0"]
    assert t["plan"]["keep"] == [3, 2, 1] and t["plan"]["horizons"] == [16, 32] and t["plan"]["eval_every"] == 4
    assert [len(r["ranking"]) for r in t["rounds"]] == [3, 2] and len(t["finalists"]) == 1
    dropped = [row for r in t["rounds"] for row in r["ranking"] if not row["kept"]]
    assert len(dropped) == 2 and all("rank" in row["why"] for row in dropped)
    out = capsys.readouterr().out
    assert "finalists:" in out and "dropped" in out
    # the reference was trained to 16, then continued to 32 in the search; the final race trained it straight
    # to 32 with the same evaluation steps: the same numbers
    report = json.loads((tmp_path / "compare.json").read_text())["report"]
    names = [r["name"] for r in report["runs"]]
    assert names[:2] == ["x0_min_snr", "x0_const"] and f"x0_{t['finalists'][0].replace(':', '_g')}" in names
    straight = next(r for r in report["runs"] if r["name"] == "x0_min_snr")["seeds"][0]
    metrics = [json.loads(line) for line in (run_folder(tmp_path / "search", 0, "x0_min_snr") / "metrics.jsonl").open()]
    continued = {m["step"]: m["fid_cls"] for m in metrics if "fid_cls" in m}
    assert sorted(continued) == straight["steps"] == list(range(4, 33, 4))
    assert [continued[s] for s in straight["steps"]] == straight["values"]
    # a rerun trains nothing; another budget is refused with the reason
    assert cli.main(_args(tmp_path, classifier)) == 0
    assert "run(s) to" not in capsys.readouterr().out
    assert cli.main(_args(tmp_path, classifier, budget="200")) == 2
    assert "budget=112, not 200" in capsys.readouterr().err
    assert torch.isfinite(torch.tensor(continued[32]))
