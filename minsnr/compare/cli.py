"""`minsnr compare PRESET|CONFIG [key=value ...]`: does Min-SNR-gamma converge faster on this data and model?

Trains one run per (seed, target, weighting) from the same config; within a seed every weighting shares
its random numbers (initial weights, data order, timesteps, noise, label drops, evaluation noise), seed k
uses train.seed + k for all of them. Each run is an ordinary resumable run in RUN_DIR/seed<S>/<target>_<name>/.
Reports the score (fid_cls, FID or bits/dim) against steps and, for every run against its target's
reference (by default its baseline: const for x0, the plain eps MSE `snr` for eps, the plain v MSE
`plain` for v), the speed-up at three quality levels of the reference, per seed and as a geometric mean
with a 95% interval over the seeds, and a verdict: faster, slower, no clear difference (rules:
minsnr.compare.verdict). A table, RUN_DIR/compare.json and RUN_DIR/compare.png. Rerun to continue.

    minsnr compare cpu --seeds 3                        # digits, x0/eps/v x baseline/min_snr, 2 CPU cores
    minsnr compare mnist data.path=mnist.npz --seeds 3 --targets x0,eps   # 28x28, about an hour on 2 cores
    minsnr compare cpu data.resolution=16 model.input_size=16   # the auto classifier sees 16x16 images too
    minsnr compare configs/my.yaml data.source=folder data.path=imgs/ model.num_classes=0   # bits/dim
    minsnr compare cpu --targets eps --reference min_snr --weightings min_snr:1,min_snr:20,min_snr@importance
    minsnr compare cifar10 data.path=cifar20k.npz       # one GPU, see configs/compare/cifar10.yaml
    minsnr compare cpu --search 60k --targets eps --seeds 3   # which weighting? halving, then a seeded race
    minsnr compare cifar10 --seeds 3 --executor slurm --slurm-partition gpu   # a Slurm job per run: docs/cluster_compare.md

Exit codes: 0 every run finished or diverged (a divergence is a result, shown in the table), 1 a run
failed with an error (its log: RUN_DIR/seed<S>/<run>/compare.log), 2 a bad config or setting, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from minsnr.compare.presets import PRESETS, Settings, resolve
from minsnr.compare.slurm import EXECUTORS, check_options
from minsnr.config import ConfigError, load_config
from minsnr.extras import MissingExtra
from minsnr.timesteps import TIMESTEPS
from minsnr.weighting import WEIGHTINGS


def _list(text: str) -> list[str]:
    """Comma-separated items; commas inside parentheses belong to an item (min_snr@lognormal(-0.4,1))."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return [t for t in items if t]


SLURM_FLAGS = (
    "slurm_partition",
    "slurm_account",
    "slurm_time",
    "slurm_gpus",
    "slurm_cpus",
    "slurm_mem",
    "slurm_folder",
)


def _check_executor(a: argparse.Namespace, settings: Settings) -> None:
    """Executor flags that would be ignored, or a bad executor value, fail here: before anything trains."""
    given = [f"--{n.replace('_', '-')}" for n in SLURM_FLAGS if getattr(a, n) is not None]
    if settings.executor == "local" and given:
        raise ConfigError(f"{given[0]} is for --executor slurm or submitit-local, not local")
    if settings.executor != "local" and a.pin is not None:
        raise ConfigError(f"--pin is for --executor local; under {settings.executor} each job has its own cores")
    check_options(settings)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="minsnr compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help=f"a preset ({', '.join(PRESETS)}) or a training config YAML")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. run_dir=runs/cmp train.seed=1")
    p.add_argument("--targets", type=_list, help="comma-separated: x0,eps,v (default: all three)")
    p.add_argument(
        "--weightings",
        type=_list,
        help="comma-separated NAME[:GAMMA][@TIMESTEPS]: baseline (the target's), a weighting "
        f"({', '.join(WEIGHTINGS)}), e.g. min_snr:10 or const@logit_normal (timesteps: "
        f"{', '.join(TIMESTEPS)}) (default: baseline,min_snr)",
    )
    p.add_argument(
        "--reference",
        help="the weighting each run's speed-up is measured against, added when "
        "--weightings lacks it (default: baseline; e.g. min_snr)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        help="seeds per run: seed k trains with train.seed + k (default: 1 for a new "
        "comparison, as many as it has for an existing one; 3 or more for a verdict)",
    )
    p.add_argument("--steps", type=int, help="training steps per run (train.steps)")
    p.add_argument("--eval-every", type=int, help="score every K steps (log.eval_every)")
    p.add_argument("--eval-num", type=int, help="samples per evaluation (log.eval_num)")
    p.add_argument(
        "--metric",
        help="the score: auto (fid_cls for labelled data, bpd for unlabelled), fid_cls, fid "
        "(Inception; needs its weights), bpd (held-out bits/dim, no labels needed)",
    )
    p.add_argument(
        "--classifier",
        help="for fid_cls: auto (trained on the images the runs see, cached in RUN_DIR), "
        "or a classifier file from `minsnr train-classifier`; inception = --metric fid",
    )
    p.add_argument("--classifier-epochs", type=int, help="epochs of the auto classifier (default 8)")
    p.add_argument("--bin-images", type=int, help="held-out images for the final per-bin x0 MSE (default 1000)")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs at a time (default: one per CPU core; on a GPU, all; --executor slurm: jobs in the queue, all)",
    )
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pin each concurrent run to its own CPU cores (default: on)",
    )
    p.add_argument(
        "--search",
        metavar="BUDGET",
        help="which weighting should I use? successive halving over --weightings x --timesteps (default: every "
        "registered weighting with its grid, crossed with every timestep law) within BUDGET training steps "
        "(e.g. 60000 or 60k, over all targets), then a seeded race of the finalists against --reference "
        "(default min_snr) and the baseline; see minsnr.compare.search",
    )
    p.add_argument("--timesteps", type=_list, help="--search: the timestep laws to cross with, e.g. uniform,laplace")
    p.add_argument("--finalists", type=int, default=2, help="--search: candidates per target in the final race")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the runs; train nothing")
    p.add_argument(
        "--executor",
        metavar="NAME",
        help=f"where the runs train: {'; '.join(f'{k}: {v}' for k, v in EXECUTORS.items())} (default: local; "
        "slurm needs pip install 'minsnr[slurm]'; see docs/cluster_compare.md). A rerun waits for the jobs "
        "still in the queue and resubmits the runs whose job ended unfinished",
    )
    p.add_argument("--slurm-partition", metavar="NAME", help="--executor slurm: the partition (default: the cluster's)")
    p.add_argument("--slurm-account", metavar="NAME", help="--executor slurm: the account to charge (default: yours)")
    p.add_argument(
        "--slurm-time",
        type=int,
        metavar="MINUTES",
        help="--executor slurm: each job's time limit in minutes (default 1440); a run that outlives it saves "
        "a checkpoint and its job is requeued",
    )
    p.add_argument("--slurm-gpus", type=int, metavar="N", help="--executor slurm: GPUs per job (default 1)")
    p.add_argument(
        "--slurm-cpus", type=int, metavar="N", help="--executor slurm: CPU cores per job, and its train.threads"
    )
    p.add_argument(
        "--slurm-mem", metavar="SIZE", help="--executor slurm: memory per job as sbatch --mem takes it, e.g. 32G"
    )
    p.add_argument(
        "--slurm-folder", metavar="DIR", help="--executor slurm: submitit's logs and pickles (default: RUN_DIR/slurm)"
    )
    a = p.parse_intermixed_args(argv)
    try:
        path, settings = resolve(a.config)
        flags = {"train.steps": a.steps, "log.eval_every": a.eval_every, "log.eval_num": a.eval_num}
        overrides = [*a.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
        base = load_config(path, overrides)
        for name in (
            "targets",
            "weightings",
            "reference",
            "classifier",
            "classifier_epochs",
            "bin_images",
            "jobs",
            "pin",
            "seeds",
            "metric",
            "executor",
            *SLURM_FLAGS,
        ):
            if getattr(a, name) is not None:
                setattr(settings, name, getattr(a, name))
        if settings.jobs < 0:
            raise ConfigError(f"--jobs {settings.jobs} must be >= 0 (0: automatic)")
        _check_executor(a, settings)
        if a.search is not None:
            from minsnr.compare.search import parse_budget, search

            budget = parse_budget(a.search)
            if a.report_only:
                raise ConfigError(
                    "--report-only with --search: rerun the search command; finished rounds train nothing"
                )
            settings.candidates, settings.search_timesteps = a.weightings, a.timesteps
            if a.reference is None:
                settings.reference = "min_snr"
            code, _ = search(base, settings, budget, a.finalists)
            return code
        if a.timesteps is not None:
            raise ConfigError("--timesteps is for --search; in a race name them per weighting: min_snr@laplace")
        from minsnr.compare.runner import compare

        code, _ = compare(base, settings, report_only=a.report_only)
        return code
    except KeyboardInterrupt:
        print("minsnr compare: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    except ConfigError as err:
        print(f"minsnr compare: error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, RuntimeError, MissingExtra) as err:
        print(f"minsnr compare: error: {err}", file=sys.stderr)
        return 1
