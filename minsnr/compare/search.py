"""`minsnr compare ... --search BUDGET`: which weighting should I use on my data? A budgeted search.

Successive halving (Jamieson & Talwalkar 2016) on common random numbers, per target:

1. Candidates: every weighting given (default: every registered one, each value of its documented grid,
   minsnr.weighting.STRATEGIES[...].grid) crossed with every timestep distribution given (default: every
   one of minsnr.timesteps.TIMESTEPS at its defaults, plus SEARCH_VARIANTS). A candidate whose loss equals
   an earlier one's at every timestep (same target-space weight and timestep pmf, e.g. p2:1 and sigmoid:0)
   is dropped before training, named with the one it equals: under common random numbers it would train
   the same model.
2. Rung r trains every surviving candidate and the reference (Min-SNR-5 by default) to horizon h * 2^r
   with seed train.seed (a run continues from its checkpoint at the previous horizon: the learning rate is
   constant after warm-up, so this is the run that never stopped), then ranks the candidates by the deepest
   of the reference's three levels they reach within the horizon and their speed-up there
   (minsnr.compare.verdict.readings: smoothed curves; `rank`) and keeps the better half (at least
   `finalists`). A candidate that starts fast but never reaches the reference's score at the horizon ranks
   below every one that does.
3. The first horizon h is the largest multiple of 4 log.every that spends at most BUDGET training steps
   over all rungs (reference included), capped so that the last horizon is at most train.steps.
4. The finalists then race with --seeds seeds at the config's full train.steps against the reference and
   the target's baseline: the ordinary `minsnr compare` report, with intervals and verdicts.

State: RUN_DIR/search.json (plan, rungs, rankings, drops with their reasons); runs in
RUN_DIR/search/seed<S>/<run>/. Rerun the same command to continue: finished rungs are read back, not trained.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minsnr.compare import verdict
from minsnr.compare.presets import RunSpec, Settings, parse_weighting, run_config, run_folder
from minsnr.compare.report import seed_run
from minsnr.config import Config, ConfigError, dump_yaml
from minsnr.files import read_json, write_json
from minsnr.loss import TrainingLoss
from minsnr.schedule import Schedule, schedule_of
from minsnr.timesteps import SEARCH_VARIANTS, TIMESTEPS, parse_timesteps
from minsnr.weighting import ADAPTIVE, STRATEGIES

STATE = "search.json"
FORMAT = "minsnr-search/1"
EVALS_PER_HORIZON = 4  # evaluations in the first horizon: enough for the three levels of a reading


def parse_budget(text: str) -> int:
    """'60000', '60k' or '1.5M' training steps -> int (ConfigError when not a positive number)."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise ConfigError(f"--search {text!r}: give a budget in training steps, e.g. 60000 or 60k") from None
    if not value >= 1:
        raise ConfigError(f"--search {text!r}: the budget must be at least 1 training step")
    return int(value)


def candidate_tokens(weightings: list[str] | None, timesteps: list[str] | None) -> list[str]:
    """NAME[:P]@TIMESTEPS tokens: each weighting (a bare name expands to its grid, or its default) crossed
    with each distribution; stateful weightings skip importance sampling (they have no fixed weight)."""
    names = weightings or [*STRATEGIES, *ADAPTIVE]
    laws = timesteps or [*TIMESTEPS, *SEARCH_VARIANTS]
    heads = []
    for name in names:
        entry = STRATEGIES.get(name)
        if ":" in name or entry is None or not entry.grid:
            heads.append(name)
        else:
            heads += [f"{name}:{value:g}" for value in entry.grid]
    tokens = []
    for law in laws:
        same_objective = TIMESTEPS[parse_timesteps(law)[0]].same_objective
        for head in heads:
            if head.partition(":")[0] in ADAPTIVE and same_objective:
                continue
            tokens.append(head if law == "uniform" else f"{head}@{law}")
    return tokens


def _loss_key(spec: RunSpec, base: Config, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the run's TrainingLoss weights each timestep by (its weight table times the importance correction)
    and the pmf it draws t from; None for a stateful weighting or a noise coupling (no fixed loss to compare)."""
    if spec.weighting in ADAPTIVE or spec.noise:
        return None
    name, args = parse_timesteps(spec.timesteps) if spec.timesteps else (base.loss.timesteps, base.loss.timestep_args)
    loss = TrainingLoss(
        schedule, target=spec.target, weighting=spec.weighting, gamma=spec.gamma, timesteps=name, timestep_args=args
    )
    return loss.weight_table * loss.timesteps.correction.double(), loss.timesteps.pmf


def distinct(specs: list[RunSpec], base: Config, reference: RunSpec) -> tuple[list[RunSpec], dict[str, str]]:
    """The specs without those whose loss equals an earlier one's (or the reference's) at every timestep
    (relative tolerance 1e-9); -> (kept, {dropped name: the name it equals})."""
    schedule = schedule_of(base.schedule)
    kept: list[tuple[RunSpec, Any]] = [(reference, _loss_key(reference, base, schedule))]
    same: dict[str, str] = {}
    for spec in specs:
        key = _loss_key(spec, base, schedule)
        twin = next(
            (
                other.name
                for other, k in kept
                if key is not None
                and k is not None
                and all(torch.allclose(a, b, rtol=1e-9, atol=0) for a, b in zip(key, k))
            ),
            None,
        )
        if twin is not None:
            same[spec.name] = twin
        elif spec.name != reference.name:
            kept.append((spec, key))
    return [s for s, _ in kept[1:]], same


def plan(count: int, budget: int, finalists: int, log_every: int, max_steps: int) -> dict[str, Any]:
    """Survivors and horizons of every rung for `count` candidates (plus the reference, trained alongside)."""
    keep = [count]
    while keep[-1] > finalists:
        keep.append(max(finalists, math.ceil(keep[-1] / 2)))
    rungs = len(keep) - 1 or 1
    # cost per unit of the first horizon: rung r trains keep[r] + 1 runs from h 2^(r-1) to h 2^r
    units = sum((keep[r] + 1) * (2**r - (2 ** (r - 1) if r else 0)) for r in range(rungs))
    grain = EVALS_PER_HORIZON * log_every
    first = budget // units // grain * grain
    if max_steps // 2 ** (rungs - 1) < grain:
        raise ConfigError(
            f"{count} candidates need {rungs} halving rounds to reach {finalists} finalist(s); the last horizon, "
            f"{2 ** (rungs - 1)} x {grain} steps, would pass train.steps={max_steps}: give fewer candidates "
            "(--weightings, --timesteps), more --finalists, or more --steps"
        )
    first = min(first, max_steps // 2 ** (rungs - 1) // grain * grain)
    if first < grain:
        need = units * grain
        raise ConfigError(
            f"--search {budget}: {count} candidates need at least {need:,} training steps for a first horizon "
            f"of {grain} steps ({EVALS_PER_HORIZON} evaluations at log.every={log_every}, over {rungs} "
            "halving rounds); raise the budget or give fewer candidates (--weightings, --timesteps)"
        )
    horizons = [first * 2**r for r in range(rungs)]
    cost = sum((keep[r] + 1) * (horizons[r] - (horizons[r - 1] if r else 0)) for r in range(rungs))
    return {"keep": keep, "horizons": horizons, "eval_every": first // EVALS_PER_HORIZON, "cost": cost}


DEPTH = ("quarter", "half", "end")  # the reference's levels, shallowest first
LEVEL_NAMES = {"quarter": "1/4", "half": "1/2", "end": "end"}


def rank(runs: dict[str, dict[str, Any]], ref: dict[str, Any], horizon: int) -> list[dict[str, Any]]:
    """Candidates (name -> seed_run at this rung) best first: first by the deepest of the reference's levels
    (its smoothed score at 1/4, 1/2, the end of the horizon) the run reaches within the horizon, then by its
    speed-up there (minsnr.compare.verdict.readings: smoothed curves; a `>=` bound at its value), then by its
    smoothed score at the horizon (what orders the runs that reach no level, early in training). A run that
    never reaches the reference's final score is slower there for certain (the verdict's rule), so it ranks
    below every run that does, however fast it started; a diverged run ranks last."""
    ref_curve = (np.array(ref["steps"]), np.array(ref["values"]))
    curves = [np.log(r["values"]) for r in [ref, *runs.values()] if len(r["values"])]
    noise = verdict.plateau_noise(curves)
    out = []
    for name, run in runs.items():
        curve = (np.array(run["steps"]), np.array(run["values"]))
        got = verdict.readings(ref_curve, curve, noise, horizon, run["status"] == "diverged")
        reached = [level for level in DEPTH if level in got and got[level].bound != "<"]
        depth = DEPTH[len(reached) - 1] if reached else None  # levels are reached in order: smoothed curves fall
        levels = {k: {"speedup": r.speedup, "bound": r.bound} for k, r in got.items()}
        final = run["values"][-1] if run["values"] else None
        score = got[depth].speedup if depth else 0.0
        # ties (above all: runs that reach no level) go to the better smoothed score at the horizon
        end = (
            float(verdict.smooth(np.log(run["values"]))[-1])
            if run["values"] and run["status"] != "diverged"
            else np.inf
        )
        out.append(
            {
                "name": name,
                "depth": depth,
                "score": score,
                "levels": levels,
                "final": final,
                "smoothed_end": float(np.exp(end)),
                "status": run["status"],
            }
        )
    return sorted(
        out,
        key=lambda r: (-(DEPTH.index(r["depth"]) + 1 if r["depth"] else 0), -r["score"], r["smoothed_end"], r["name"]),
    )


def rung_config(base: Config, horizon: int, eval_every: int) -> Config:
    """The search runs' config: train to `horizon`, evaluate and checkpoint every `eval_every` steps."""
    return dataclasses.replace(
        base,
        run_dir=str(Path(base.run_dir) / "search"),
        train=dataclasses.replace(base.train, steps=horizon),
        log=dataclasses.replace(base.log, eval_every=eval_every, preview_every=0),
        checkpoint=dataclasses.replace(base.checkpoint, every=eval_every),
    )


def token(spec: RunSpec) -> str:
    """The --weightings token that names `spec` again (parse_weighting's inverse)."""
    head = spec.weighting + (f":{spec.gamma:g}" if spec.explicit_gamma and spec.gamma is not None else "")
    return head + (f"@{spec.timesteps}" if spec.timesteps else "") + (f"+{spec.noise}" if spec.noise else "")


def _at(run: dict[str, Any], horizon: int) -> dict[str, Any]:
    """A seed_run cut at `horizon` (a later rerun with a larger budget may have trained further)."""
    keep = [i for i, s in enumerate(run["steps"]) if s <= horizon]
    return {**run, "steps": [run["steps"][i] for i in keep], "values": [run["values"][i] for i in keep]}


def prepare(base: Config, settings: Settings, budget: int, finalists: int) -> dict[str, Any]:
    """Per target: the reference, the distinct candidates, the twins dropped and the plan (nothing trains)."""
    targets: dict[str, Any] = {}
    for target in settings.targets:
        ref = parse_weighting(settings.reference, target, base.loss.gamma, base.loss.weighting)
        tokens = candidate_tokens(settings.candidates, settings.search_timesteps)
        specs = list({s.name: s for s in (parse_weighting(t, target, None) for t in tokens)}.values())
        kept, same = distinct(specs, base, ref)
        if not kept:
            raise ConfigError(f"{target}: no candidate differs from the reference {ref.name}; give other --weightings")
        targets[target] = {
            "reference": ref,
            "candidates": kept,
            "same": same,
            "plan": plan(len(kept), budget // len(settings.targets), finalists, base.log.every, base.train.steps),
        }
    return targets


def search(base: Config, settings: Settings, budget: int, finalists: int) -> tuple[int, dict[str, Any]]:
    """Successive halving per target (module docstring), then the seeded race of the finalists. -> (exit
    code, the search's state)."""
    import os

    from minsnr.compare.classifier import ensure_classifier, resolve_metric
    from minsnr.compare.presets import check_base
    from minsnr.compare.runner import compare, exclusive, run_is_done, run_threads, train_runs

    if finalists < 1:
        raise ConfigError(f"--finalists {finalists}: keep at least 1")
    base, notes = check_base(base)
    targets = prepare(base, settings, budget, finalists)
    for target, v in targets.items():
        first = v["plan"]["horizons"][0]
        if first < 2 * base.optim.warmup_steps:
            print(
                f"warning: {target}: the first round ends at {first} steps, within twice the learning-rate warm-up "
                f"({base.optim.warmup_steps}): its ranking reads early, noisy scores; a larger --search budget or "
                "fewer candidates give a longer first round"
            )
    metric = resolve_metric(base, settings)
    run_dir = Path(base.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for note in notes:
        print(note)
    with exclusive(run_dir / "search.lock", "minsnr compare --search"):
        on_gpu = base.train.device != "cpu" and torch.cuda.is_available()
        classifier = ensure_classifier(base, settings, metric, run_dir, "cuda" if on_gpu else "cpu")
        state = _load(run_dir, base, budget, finalists, metric, targets)
        write_json(run_dir / STATE, state)  # the plan, before anything trains
        cores = sorted(os.sched_getaffinity(0))
        alive = {t: list(v["candidates"]) for t, v in targets.items()}
        seed = base.train.seed
        jobs = settings.jobs or (1 << 10 if on_gpu else len(cores))
        threads = run_threads(base, settings, min(jobs, len(cores)), cores)
        for r in range(max(len(v["plan"]["horizons"]) for v in targets.values())):
            todo, rung_of = [], {}
            for target, v in targets.items():
                if r >= len(v["plan"]["horizons"]):
                    continue
                horizon, every = v["plan"]["horizons"][r], v["plan"]["eval_every"]
                rung_of[target] = horizon
                for spec in [v["reference"], *alive[target]]:
                    cfg = run_config(
                        rung_config(base, horizon, every), spec, run_dir / "search", classifier, threads, seed, metric
                    )
                    folder = Path(cfg.run_dir)
                    if run_is_done(folder, horizon, 0):
                        continue
                    folder.mkdir(parents=True, exist_ok=True)
                    dump_yaml(cfg, folder / "config.yaml")
                    todo.append((spec, seed, folder / "config.yaml"))
            if todo:
                print(f"search round {r + 1}: {len(todo)} run(s) to {sorted(set(rung_of.values()))} steps", flush=True)
                start = time.perf_counter()
                rounds = run_dir / "search"
                if not train_runs(
                    todo, settings, rounds, min(jobs, len(todo)), cores, threads, 0, max(rung_of.values())
                ):
                    write_json(run_dir / STATE, state)
                    return 130, state
                state["wall_s"] = state.get("wall_s", 0.0) + time.perf_counter() - start
            for target, horizon in rung_of.items():
                v = targets[target]
                read = {
                    s.name: _at(seed_run(run_folder(run_dir / "search", seed, s.name), metric, seed), horizon)
                    for s in [v["reference"], *alive[target]]
                }
                ref = read.pop(v["reference"].name)
                ranking = rank(read, ref, horizon)
                keep = v["plan"]["keep"][min(r + 1, len(v["plan"]["keep"]) - 1)]
                names = [row["name"] for row in ranking[:keep]]
                for i, row in enumerate(ranking):
                    row["kept"] = i < keep
                    row["why"] = "" if i < keep else f"rank {i + 1} of {len(ranking)} at {horizon} steps (kept {keep})"
                state["targets"][target]["rounds"][r:] = [{"horizon": horizon, "ranking": ranking}]
                alive[target] = [s for s in alive[target] if s.name in names]
            write_json(run_dir / STATE, state)
        for target in targets:
            state["targets"][target]["finalists"] = [token(s) for s in alive[target]]
        write_json(run_dir / STATE, state)
        print(table(state))
    per_target = {t: ["baseline", *state["targets"][t]["finalists"]] for t in targets}
    final = dataclasses.replace(settings, per_target=per_target)
    code, report = compare(base, final)
    state["race"] = {"seeds": report.get("seeds"), "report": "compare.json"}
    write_json(run_dir / STATE, state)
    return code, state


def _load(
    run_dir: Path, base: Config, budget: int, finalists: int, metric: str, targets: dict[str, Any]
) -> dict[str, Any]:
    """search.json, new or continued; a different budget, candidate list or metric is an error naming it."""
    want = {
        "format": FORMAT,
        "budget": budget,
        "finalists": finalists,
        "metric": metric,
        "targets": {
            t: {
                "reference": v["reference"].name,
                "candidates": [s.name for s in v["candidates"]],
                "same": v["same"],
                "plan": v["plan"],
                "rounds": [],
                "finalists": [],
            }
            for t, v in targets.items()
        },
    }
    state = read_json(run_dir / STATE)
    if state is None:
        return want
    for key in ("format", "budget", "finalists", "metric"):
        if state.get(key) != want[key]:
            raise ConfigError(
                f"{run_dir / STATE} was started with {key}={state.get(key)!r}, not {want[key]!r}; rerun with the "
                "same settings to continue it, or choose another run_dir"
            )
    for t, v in want["targets"].items():
        old = state["targets"].get(t)
        if old is None or old["candidates"] != v["candidates"] or old["plan"] != v["plan"]:
            raise ConfigError(
                f"{run_dir / STATE}: the candidates or plan of target {t} changed; rerun with the same "
                "--weightings/--timesteps/--targets, or choose another run_dir"
            )
    return state


def table(state: dict[str, Any]) -> str:
    """What the search kept and dropped, round by round, per target."""
    lines = []
    for target, t in state["targets"].items():
        lines.append(f"search, target {target}: {len(t['candidates'])} candidates against {t['reference']}")
        for name, twin in t["same"].items():
            lines.append(f"  dropped before training: {name} (the same loss at every timestep as {twin})")
        for rnd in t["rounds"]:
            lines.append(
                f"  round at {rnd['horizon']} steps (speed-up over {t['reference']} at the deepest of its levels "
                "reached: 1/4, 1/2, end):"
            )
            for row in rnd["ranking"]:
                mark = "kept   " if row["kept"] else "dropped"
                status = "" if row["status"] == "finished" else f" [{row['status']}]"
                where = f"at {LEVEL_NAMES[row['depth']]}" if row["depth"] else "reaches none"
                lines.append(f"    {mark} {row['score']:5.2f}x {where:<12} {row['name']}{status}")
        if t["finalists"]:
            lines.append(f"  finalists: {', '.join(t['finalists'])}")
    return "\n".join(lines)
