"""Small helpers shared by the evaluation verbs."""

from __future__ import annotations

import sys
from collections.abc import Callable

from minsnr.distributed import resolve_device

__all__ = ["resolve_device", "run_verb"]


def run_verb(prog: str, body: Callable[[], int]) -> int:
    """Run a verb's body; a bad file, value or setting ends it with one line on stderr and exit code 1."""
    try:
        return body()
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
