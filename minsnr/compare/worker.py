"""One run of a comparison, as a subprocess of `minsnr compare`:

    python -m minsnr.compare.worker RUN_DIR/config.yaml [--cpus 0,1] [--bin-images 1000]

Pins itself to --cpus (before torch starts its threads), trains with the ordinary hooks of `minsnr train`
(the fid_cls evaluation every log.eval_every steps; resume=auto continues an interrupted run), then
measures the unweighted x0 MSE per timestep bin of the final EMA model on held-out images (figure 6),
reused when it is already there for this step. Writes RUN_DIR/compare_status.json:
    {"state": "finished" | "stopped" | "diverged" | "failed", "step": N, "message": "..."}
A non-finite loss is a result ("diverged", exit 0), not a crash; any other error is "failed" (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from minsnr.files import read_json, write_json

STATUS = "compare_status.json"
LOSSES = "compare_losses.json"


def final_bin_losses(run_dir: Path, step: int, num: int, seed: int = 0) -> dict[str, Any]:
    """Figure 6 at the end of training: the EMA model's unweighted x0 MSE per 100-step timestep bin on
    held-out images (the test split; the training images when the data has none), same images, timesteps
    and noise for every run of the comparison."""
    import torch

    from minsnr.checkpoint import load_model
    from minsnr.evaluate.losses import bin_losses, held_out
    from minsnr.timesteps import bins

    cached = read_json(run_dir / LOSSES)
    if cached is not None and cached.get("step") == step and cached.get("num_images") == num:
        return cached
    model, cfg = load_model(run_dir / "checkpoints" / "latest.pt", ema=True)
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    split = "test"
    try:
        x, labels = held_out(cfg, None, split, num, seed)
    except (KeyError, ValueError) as err:  # no test split: say so, measure on training images
        print(f"figure 6: no held-out split ({err}); using training images", file=sys.stderr)
        split = "train"
        x, labels = held_out(cfg, None, split, num, seed)
    mse = bin_losses(model.to(device), cfg, x, labels, seed=seed, device=device)
    out = {
        "step": step,
        "split": split,
        "num_images": num,
        "seed": seed,
        "bins": [[lo, hi] for lo, hi in bins(cfg.schedule.num_timesteps)],
        "mse": mse,
    }
    write_json(run_dir / LOSSES, out)
    return out


def command(config_path: Path | str, bin_images: int, parent: int) -> list[str]:
    """The command line that trains one run (this module), for the local pool and for a Slurm job alike."""
    return [
        sys.executable,
        "-m",
        "minsnr.compare.worker",
        str(config_path),
        "--bin-images",
        str(bin_images),
        "--parent",
        str(parent),
    ]


def environment(threads: int, procs_per_gpu: int) -> dict[str, str]:
    """The run's environment: `threads` CPU threads, progress lines at most every 30 s, the processes sharing
    its GPU (minsnr.data.device), and this same minsnr importable."""
    root = str(Path(__file__).resolve().parents[2])
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TQDM_MININTERVAL": "30",
        "MINSNR_PROCS_PER_GPU": str(procs_per_gpu),
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }


def die_with_parent(parent: int) -> None:
    """Linux: SIGTERM (save a checkpoint, stop) when the comparison dies, so that no orphan keeps writing
    into a run folder that a rerun of the comparison continues."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError) as err:
        print(f"warning: runs will not stop with the comparison ({err})", file=sys.stderr)
    if os.getppid() != parent:  # it died before prctl took effect
        sys.exit("the comparison that started this run is gone; not training")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m minsnr.compare.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="the run's config.yaml, written by minsnr compare")
    p.add_argument("--cpus", default="", help="comma-separated CPU cores to pin this process to")
    p.add_argument("--bin-images", type=int, default=1000, help="held-out images for figure 6; 0 skips it")
    p.add_argument("--parent", type=int, default=0, help="stop (save and exit) when this process dies")
    a = p.parse_args(argv)
    if a.parent:
        die_with_parent(a.parent)
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})

    from minsnr.config import load_config
    from minsnr.hooks import build_hooks
    from minsnr.train import NonFiniteLoss, train

    cfg = load_config(a.config)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    status = run_dir / STATUS
    try:
        result = train(cfg, build_hooks(cfg))
        if result["step"] < cfg.train.steps:
            write_json(
                status, {"state": "stopped", "step": result["step"], "message": "interrupted; rerun to continue"}
            )
            return 0
        if a.bin_images > 0:  # 0: a search round, which reads only the score curves
            final_bin_losses(run_dir, result["step"], a.bin_images)
    except NonFiniteLoss as err:
        write_json(status, {"state": "diverged", "step": err.step, "message": str(err)})
        print(f"diverged: {err}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        write_json(status, {"state": "stopped", "step": None, "message": "interrupted; rerun to continue"})
        return 0
    except Exception as err:  # noqa: BLE001 -- recorded for the report, then the traceback goes to the log
        write_json(status, {"state": "failed", "step": None, "message": f"{type(err).__name__}: {err}"})
        traceback.print_exc()
        return 1
    write_json(status, {"state": "finished", "step": result["step"], "message": ""})
    return 0


if __name__ == "__main__":
    sys.exit(main())
