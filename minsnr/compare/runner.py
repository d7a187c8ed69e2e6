"""Run a comparison: one ordinary, resumable training run per (seed, target, weighting) in
RUN_DIR/seed<S>/<name>/, launched as pinned subprocesses (minsnr.compare.worker), seed by seed.

Common random numbers come from the trainer itself: the runs of one seed get the same train.seed, so the
same initial weights, data order, timesteps, noise and label drops at every step, and the evaluation hook
samples the same labels and noise at the same steps. The runs of a seed differ only in the loss; seed k
of a comparison trains with train.seed + k (minsnr.compare.presets.seed_values).

RUN_DIR/compare.json (written atomically) holds the comparison's state: the shared config, the runs, the
number of seeds trained, the steps, the score, its sanity (minsnr.compare.sanity), plus the latest report.
Rerunning the same command continues every unfinished run from its last checkpoint and reuses finished
runs and their evaluations; a changed config key is an error naming the key (train.steps may grow, and
--seeds may grow; a smaller --seeds reports on the first seeds and deletes nothing).

Concurrency: at most `jobs` runs at a time; on the CPU one per core by default, each with
cores/jobs threads (train.threads and OMP_NUM_THREADS) and pinned to its own cores; on a GPU every run at
once by default (the processes share the GPU; pinning still splits the CPU cores between them).
"""

from __future__ import annotations

import fcntl
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from minsnr.compare.jobs import live_jobs
from minsnr.compare.pool import Todo, label, run_all, slots
from minsnr.compare.presets import RunSpec, Settings, check_base, run_config, run_matrix, seed_values
from minsnr.compare.slurm import run_slurm
from minsnr.compare.worker import LOSSES, STATUS
from minsnr.config import Config, ConfigError, dump_yaml, to_dict
from minsnr.files import read_json, write_json

FORMAT = "minsnr-compare/2"  # /2: seeds, runs in RUN_DIR/seed<S>/<run>
STATE = "compare.json"
PER_RUN = (
    "run_dir",
    "train.steps",
    "train.threads",
    "loss.target",
    "loss.weighting",
    "log.eval_classifier",
    "log.eval_metric",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "args":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def shared_config(base: Config) -> dict[str, Any]:
    """The config every run shares, flattened to dotted keys (the per-run and growable keys left out)."""
    return {k: v for k, v in _flatten(to_dict(base)).items() if k not in PER_RUN}


def load_state(run_dir: Path, base: Config, classifier: str, metric: str) -> dict[str, Any]:
    """compare.json, created for a new comparison; an existing one must describe the same experiment."""
    shared = shared_config(base)
    state = read_json(run_dir / STATE)
    if state is None:
        return {
            "format": FORMAT,
            "config": shared,
            "steps": base.train.steps,
            "eval_every": base.log.eval_every,
            "classifier": classifier,
            "metric": metric,
            "runs": [],
            "seeds": 0,
        }
    if state.get("format") == "minsnr-compare":
        raise ConfigError(
            f"{run_dir / STATE} is a one-seed comparison of an older minsnr (runs in RUN_DIR/<run>); "
            "choose another run_dir (its runs stay where they are)"
        )
    if state.get("format") != FORMAT:
        raise ConfigError(f"{run_dir / STATE} is not a minsnr comparison; choose another run_dir")
    defaults = shared_config(Config())  # a key a later minsnr added reads as its default in an older state
    stored = {**{k: v for k, v in defaults.items() if k not in state["config"]}, **state["config"]}
    changed = sorted(k for k in set(shared) | set(stored) if shared.get(k) != stored.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {stored.get(k)!r} -> {shared.get(k)!r}" for k in changed[:5])
        raise ConfigError(
            f"{run_dir / STATE} was started with another config ({diffs}); rerun with the same "
            "settings to continue it, or choose another run_dir"
        )
    if state.get("metric") != metric:
        raise ConfigError(
            f"{run_dir / STATE} scores with {state.get('metric')!r}, not {metric!r}; use the same "
            "--metric or another run_dir"
        )
    if state["classifier"] != classifier:
        raise ConfigError(
            f"{run_dir / STATE} scores with classifier {state['classifier']!r}, not {classifier!r}; "
            "use the same --classifier or another run_dir"
        )
    if base.train.steps < state["steps"]:
        raise ConfigError(
            f"{run_dir / STATE} trains to {state['steps']} steps; --steps/train.steps may grow, "
            f"not shrink to {base.train.steps}"
        )
    state["steps"] = base.train.steps
    return state


def run_is_done(run_dir: Path, steps: int, bin_images: int) -> str | None:
    """Why this run needs no launch ("finished", "diverged"), or None when it must (continue to) train.
    bin_images 0: no figure-6 losses are asked for (a search round)."""
    status = read_json(run_dir / STATUS)
    if status is None:
        return None
    if status["state"] == "diverged":
        return "diverged"
    losses = read_json(run_dir / LOSSES)
    if (
        status["state"] == "finished"
        and status["step"] >= steps
        and (
            bin_images == 0
            or (losses is not None and losses["step"] == status["step"] and losses["num_images"] == bin_images)
        )
    ):
        return "finished"
    return None


def prepare_runs(
    base: Config,
    specs: list[RunSpec],
    seeds: list[int],
    bin_images: int,
    run_dir: Path,
    classifier: str | None,
    metric: str,
    threads: int,
    state: dict[str, Any],
) -> list[Todo]:
    """Write every run's config.yaml, add new runs to the state; -> the runs that need training, seed by seed
    (so that a comparison stopped early holds whole seeds)."""
    todo = []
    for spec in specs:
        entry = {
            "name": spec.name,
            "target": spec.target,
            "weighting": spec.weighting,
            "gamma": spec.gamma,
            "timesteps": spec.timesteps or base.loss.timesteps,
            **({"noise": spec.noise} if spec.noise else {}),
        }
        if entry not in state["runs"]:
            state["runs"].append(entry)
    for seed in seeds:
        for spec in specs:
            cfg = run_config(base, spec, run_dir, classifier, threads, seed, metric)
            folder = Path(cfg.run_dir)
            done = run_is_done(folder, base.train.steps, bin_images)
            if done:
                print(
                    f"{label(spec, seed)}: {done} earlier, reused"
                    + (" (delete the folder to retry)" if done == "diverged" else "")
                )
                continue
            folder.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, folder / "config.yaml")
            todo.append((spec, seed, folder / "config.yaml"))
    return todo


def seed_count(settings: Settings, state: dict[str, Any] | None) -> int:
    """--seeds, else as many as the comparison already has (1 for a new one)."""
    if settings.seeds is not None:
        if settings.seeds < 1:
            raise ConfigError(f"--seeds {settings.seeds}: give at least 1 (3 or more for an interval worth reading)")
        return settings.seeds
    return max(1, int((state or {}).get("seeds", 0)))


def compare(base: Config, settings: Settings, *, report_only: bool = False) -> tuple[int, dict[str, Any]]:
    """Train (or continue) every run, then report. -> (exit code, report). Exit codes: 0 every run finished
    or diverged (divergence is a result), 1 a run failed, 130 interrupted."""
    from minsnr.compare.classifier import resolve_metric

    base, notes = check_base(base)
    specs = run_matrix(settings, base.loss.gamma, base.loss.weighting)
    run_dir = Path(base.run_dir)
    if report_only:
        state = read_json(run_dir / STATE)
        if state is None:
            raise ConfigError(f"{run_dir / STATE} not found: nothing to report (run without --report-only first)")
        seeds = seed_values(base, seed_count(settings, state))
        return _report(run_dir, specs, seeds, state, state["metric"]), state["report"]
    metric = resolve_metric(base, settings)
    for note in notes:
        print(note)
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(run_dir / "compare.lock", "minsnr compare"):
        return _locked(base, settings, specs, run_dir, metric)


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` (released on exit, and when this process ends, however); ConfigError naming
    `what` when another process holds it."""
    with path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another {what} is running on {path.parent}; wait for it or stop it first") from None
        yield


def _locked(
    base: Config, settings: Settings, specs: list[RunSpec], run_dir: Path, metric: str
) -> tuple[int, dict[str, Any]]:
    """compare() once it holds the comparison's lock."""
    import torch

    from minsnr.compare.classifier import ensure_classifier

    on_gpu = base.train.device != "cpu" and torch.cuda.is_available()
    cores = sorted(os.sched_getaffinity(0))
    state = load_state(run_dir, base, settings.classifier, metric)
    count = seed_count(settings, state)
    seeds = seed_values(base, count)
    if count < state["seeds"]:
        print(f"reporting on the first {count} of the {state['seeds']} seeds trained (the others stay in {run_dir})")
    state["seeds"] = max(count, state["seeds"])
    classifier = ensure_classifier(base, settings, metric, run_dir, "cuda" if on_gpu else "cpu")
    jobs = settings.jobs or (len(specs) * count if on_gpu else min(len(specs) * count, len(cores)))
    threads, local = run_threads(base, settings, jobs, cores), settings.executor == "local"
    todo = prepare_runs(base, specs, seeds, settings.bin_images, run_dir, classifier, metric, threads, state)
    write_json(run_dir / STATE, state)
    device = torch.device("cuda" if on_gpu else "cpu")
    check = run_config(base, next(s for s in specs if s.reference), run_dir, classifier, threads, seeds[0], metric)
    measure_sanity(check, metric, classifier, run_dir, state, device)
    finished = True
    if todo:
        print(
            f"{len(todo)} run(s) to train, {jobs} at a time on {'the GPU' if on_gpu else 'the CPU'} "
            f"({len(cores)} core(s){', pinned' if settings.pin else ''}); logs in {run_dir}/seed*/<run>/compare.log"
            if local
            else f"{len(todo)} run(s) to train as {settings.executor} jobs, "
            f"{settings.jobs or 'all'} in the queue at a time; logs in {run_dir}/seed*/<run>/compare.log"
        )
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        finished = train_runs(todo, settings, run_dir, jobs, cores, threads, settings.bin_images, base.train.steps)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        session = {
            "runs": [label(s, seed) for s, seed, _ in todo],
            "executor": settings.executor,
            "jobs": jobs if local else settings.jobs,
            "threads": threads,
            "wall_s": time.perf_counter() - start,
            "cpu_s": cpu,
            "load": os.getloadavg(),
        }
        state.setdefault("sessions", []).append(session)  # how long it took, to plan the next one
        print(
            f"trained in {session['wall_s']:.0f} s wall, {cpu:.0f} CPU-seconds in the runs "
            f"(load average now {session['load'][0]:.1f})"
        )
    if finished:
        measure_sanity(check, metric, classifier, run_dir, state, device)
    code = _report(run_dir, specs, seeds, state, metric)
    return (130 if not finished else code), state["report"]


def run_threads(base: Config, settings: Settings, jobs: int, cores: list[int]) -> int:
    """CPU threads of every run, fixed per comparison since results depend on it: train.threads, else the cores
    of one local slot (`jobs` runs at a time on `cores`), or a Slurm job's --slurm-cpus."""
    if base.train.threads:
        return base.train.threads
    return len(slots(jobs, cores)[0]) if settings.executor == "local" else settings.slurm_cpus or 1


def train_runs(
    todo: list[Todo],
    settings: Settings,
    run_dir: Path,
    jobs: int,
    cores: list[int],
    threads: int,
    bin_images: int,
    steps: int,
) -> bool:
    """Train `todo` with settings.executor: local subprocesses (pool.run_all, `jobs` at a time on `cores`) or
    jobs through submitit (slurm.run_slurm). False when interrupted. A run whose recorded Slurm job still
    trains is refused to the local executor: two trainers must never share a run folder."""
    if settings.executor != "local":
        return run_slurm(todo, settings, run_dir, threads, bin_images, steps)
    busy = live_jobs(todo)
    if busy:
        raise ConfigError(
            f"{', '.join(busy)} still train(s) as a submitted job; rerun with the --executor that submitted "
            "it to wait for it, or cancel it first"
        )
    return run_all(todo, jobs, cores, settings.pin, bin_images, steps)


def measure_sanity(
    cfg: Config, metric: str, classifier: str | None, run_dir: Path, state: dict[str, Any], device: Any
) -> None:
    """The score's floor and ceiling (once, before training) and its noise on `cfg`'s run (the first
    reference run of the first seed) once that run has finished (again when --steps grew): compare.json."""
    from minsnr.compare import sanity

    found = state.setdefault("sanity", {})
    if "ceiling" not in found:
        print(
            "score check: scoring an untrained model" + ("" if metric == "bpd" else " and real held-out images"),
            flush=True,
        )
        found.update(
            sanity.bounds(cfg, metric, classifier, run_dir, device), classifier=sanity.classifier_meta(classifier)
        )
        write_json(run_dir / STATE, state)
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()  # the runs start next and share the GPU
    folder = Path(cfg.run_dir)
    status = read_json(folder / STATUS)
    if status is None or status["state"] != "finished" or (found.get("noise") or {}).get("step") == status["step"]:
        return
    from minsnr.evaluate.plots import read_metric

    steps, values = read_metric(folder, metric)
    print(
        f"score check: {folder.name} at step {status['step']} under {sanity.NOISE_SEEDS} more evaluation seeds",
        flush=True,
    )
    found["noise"] = {
        **sanity.noise(
            cfg, metric, classifier, run_dir, folder / "checkpoints" / "latest.pt", float(values[-1]), device
        ),
        "step": status["step"],
    }
    write_json(run_dir / STATE, state)


def _report(run_dir: Path, specs: list[RunSpec], seeds: list[int], state: dict[str, Any], metric: str) -> int:
    """Build, store (compare.json), plot and print the report; -> 1 if a run failed, else 0."""
    from minsnr.compare import report as rep

    result = rep.build(run_dir, specs, seeds, state, metric)
    state["report"] = result
    write_json(run_dir / STATE, state)
    plotted = rep.plot(result, run_dir / "compare.png")
    print(rep.table(result))
    print(f"wrote {run_dir / STATE}" + (f" and {run_dir / 'compare.png'}" if plotted else ""))
    return 1 if any(s["status"] == "failed" for r in result["runs"] for s in r["seeds"]) else 0
