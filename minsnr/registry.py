"""Named choices. Every list of valid names (models, weightings, timestep distributions, schedules,
samplers, data sources, crops) is the key set of one dict next to the code it names; config
validation, CLI `choices`, error messages and the README's table of choices all read those dicts."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """registry[name], or a ValueError that names `what`, the bad value and every valid name."""
    check(name, registry, what)
    return registry[name]


def check(name: object, valid: Collection[str], what: str) -> None:
    """A ValueError that names `what`, the bad value and every valid name, unless `name` is one of `valid`."""
    if name not in valid:
        raise ValueError(f"{what}={name!r} is not valid{did_you_mean(name, valid)}; choose one of: {', '.join(valid)}")


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when none is close."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
