"""`minsnr train CONFIG.yaml [key=value ...]`: load and check the config, wire the periodic hooks
(`minsnr.hooks`: EMA preview grid, optional fid_cls evaluation and Pareto monitor), train, say where
everything went."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from minsnr.checkpoint import EMA_EXPORT, CheckpointError
from minsnr.config import ConfigError, load_config, packaged_configs
from minsnr.data import BadImagesError
from minsnr.distributed import teardown
from minsnr.evaluate.util import HelpFormatter, log_through_progress_bars
from minsnr.extras import MissingExtra
from minsnr.files import WriteError
from minsnr.hooks import build_hooks
from minsnr.resume import describe_last_good
from minsnr.train import NonFiniteLoss, train


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="minsnr train",
        description="Train a diffusion model.",
        formatter_class=HelpFormatter,
        epilog="Overrides are dotted keys, e.g. loss.weighting=min_snr train.steps=1000; see README.md for every key.",
    )
    parser.add_argument(
        "config", nargs="?", help="YAML file (configs/quickstart.yaml) or a packaged config's name (quickstart)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--list", action="store_true", help="list the packaged configs and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, path in packaged_configs().items():  # each with the first sentence of its header comment
            header = " ".join(ln.lstrip("# ") for ln in path.read_text().splitlines() if ln.startswith("#"))
            print(f"{name:<26} {header.split('. ')[0]}")
        return 0
    if args.config is None:
        parser.error("a config is required: a YAML file or a packaged name (minsnr train --list)")
    log_through_progress_bars()  # a skipped-file warning on its own line, not glued to the progress bar
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, build_hooks(cfg))
    except (
        ConfigError,
        CheckpointError,
        NonFiniteLoss,
        BadImagesError,
        FileNotFoundError,
        NotADirectoryError,  # data.path names a file where a folder is expected
        ValueError,
        MissingExtra,
    ) as err:
        print(f"minsnr train: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except OSError as err:  # disk full, no permission ...: say which file, and what is safe
        what = str(err)
        if not isinstance(err, WriteError) and err.errno == errno.ENOSPC:
            what = f"disk full writing {err.filename or 'a file of the run'} ({err.strerror})"
        safe = describe_last_good(Path(cfg.run_dir) / "checkpoints") if cfg is not None else "no checkpoint was written"
        print(f"minsnr train: error: {what}; {safe}", file=sys.stderr)
        return 1
    finally:
        teardown()  # a clean stop on every rank, also when one rank failed alone
    run, stopped = Path(result["run_dir"]), int(result["stopped_by_signal"])
    if os.environ.get("RANK", "0") == "0" and stopped:  # torchrun sets RANK; print once
        print(f"\nstopped at step {result['step']}; run the same command to resume")
    elif os.environ.get("RANK", "0") == "0":
        print(f"\ntrained to step {result['step']}; outputs in {run}/:")
        for name, what in [
            ("samples.png", "latest EMA sample grid"),
            ("checkpoints/latest.pt", "checkpoint (resume=auto)"),
            (EMA_EXPORT, "EMA weights"),
            ("metrics.jsonl", "metrics"),
            ("config.yaml", "resolved config"),
            ("tensorboard", "tensorboard --logdir " + str(run / "tensorboard")),
        ]:
            if (run / name).exists():
                print(f"  {run / name}: {what}")
    return 128 + stopped if stopped else 0  # the shell's convention for a run ended by a signal (130, 143)
