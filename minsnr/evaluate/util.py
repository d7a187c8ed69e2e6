"""Small helpers shared by the command-line verbs: help formatting, progress bars, log routing, errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def run_verb(prog: str, body: Callable[[], int]) -> int:
    """Run a verb's body; a bad file, value or setting ends it with one line on stderr and exit code 1."""
    try:
        return body()
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        what = err.args[0] if isinstance(err, KeyError) and err.args else err  # a KeyError's str() adds quotes
        print(f"{prog}: error: {what}", file=sys.stderr)
        return 1


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` keeps the description's line breaks and appends every option's default, except where the
    default is None (the help then says what happens instead) or the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def progress(batches: Iterable[np.ndarray], total: int, desc: str) -> Iterator[np.ndarray]:
    """`batches` unchanged, counted in images on a progress bar (stderr)."""
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


class TqdmLogHandler(logging.StreamHandler):
    """Writes log records with tqdm.write: a warning lands on its own line above the progress bars
    instead of being glued to the end of the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # the logging module's convention: report, never raise from a handler
            self.handleError(record)


def log_through_progress_bars(level: int = logging.WARNING) -> None:
    """The verbs' logging set-up: records at `level` and above to stderr through `TqdmLogHandler`
    (a no-op when the root logger is already configured, e.g. by an application embedding minsnr)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[TqdmLogHandler()])


def check_ema_choice(checkpoint: str | Path, ema: bool) -> None:
    """An exported .safetensors file holds the EMA weights only, so --no-ema cannot be honoured with it."""
    if not ema and Path(checkpoint).suffix == ".safetensors":
        raise ValueError(
            f"--no-ema asks for the raw training weights, but {checkpoint} is an EMA-only export; "
            "pass the run's checkpoints/latest.pt instead, or drop --no-ema"
        )
