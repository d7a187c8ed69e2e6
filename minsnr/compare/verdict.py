"""How much faster, and how sure: the speed-up of one run over its reference within a seed, and the verdict
across seeds, from (steps, scores) curves, lower scores better: numpy and scipy, no training here.

Smoothing. A score curve is noisy (fid_cls on 500 samples moves by 10-30% between evaluations), so every
reading is taken on a smoothed curve: in log score, a running mean over three evaluations (the evaluation
and its two neighbours; two at either end), then the non-increasing fit of least squares (isotonic
regression, scipy.optimize.isotonic_regression: "the best score so far", without letting one lucky
evaluation set it). The running mean gives one evaluation a weight of at most 1/2, and isotonic regression
moves no point by more than its input moved, so a change of one evaluation by d (in log) moves every
smoothed score by at most d / 2: no single evaluation can swing a reading.

Levels. The speed-up is read at three quality levels of the reference's smoothed curve, as figure 1 reads
it at a target FID: its score at a quarter, at half and at the end of its run. At each level
    speed-up = step at which the reference's smoothed curve reaches the level
               / step at which the run's smoothed curve reaches it        (linear between evaluations).
A level is *not informative* in a seed when the run's smoothed curve ends within 2 noise of it (in log
score; noise: `plateau_noise`), so that noise decides whether and when the run gets there (both curves
on one plateau), or when the reference reaches it before its second evaluation. A run that reaches a level before its second
evaluation gives only a lower bound (reference step / second evaluation step: "use a smaller
--eval-every"); a run that never reaches it (or diverged) is censored and gives only an upper bound
(reference step / its last evaluation step, or the planned steps when it diverged). Either bound lies
between 1 and the true speed-up, so it enters the summary as its value and can only pull the verdict
toward "no clear difference".

Verdict. Per level, over the seeds (each seed's run against the same seed's reference: paired): the
geometric mean of the speed-ups and a 95% t-interval on the mean log speed-up (scipy.stats.t; with few
seeds the t quantile is wide on purpose: 12.7 at 2 seeds, 4.3 at 3, 2.8 at 5). `faster` when the whole
interval is above 1, `slower` when it is below 1 or when the run never reaches the level in any seed
(each seed's speed-up is then below 1 for certain), else `no clear difference`; a level that is not
informative in every seed gives `within noise`, one seed gives no verdict. The headline verdict of a run
is the one at the deepest level informative in every seed (end, else half, else quarter).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats
from scipy.optimize import isotonic_regression

LEVELS = {"quarter": 0.25, "half": 0.5, "end": 1.0}  # fraction of the reference's run
DEEPEST_FIRST = ("end", "half", "quarter")
NOISE_MARGIN = 2.0  # a level must lie this many plateau-noise units away from the run's smoothed end
CONFIDENCE = 0.95


def first_reach(steps: np.ndarray, values: np.ndarray, threshold: float) -> float | None:
    """The first step where the curve (linear between evaluations) is at or below `threshold`."""
    below = np.flatnonzero(values <= threshold)
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (v0 - threshold) / (v0 - v1) * (s1 - s0))


def smooth(values: np.ndarray) -> np.ndarray:
    """Log scores [n] -> smoothed, non-increasing log scores [n] (module docstring)."""
    y = np.asarray(values, dtype=np.float64)
    if len(y) < 3:
        return isotonic_regression(np.full(len(y), y.mean()) if len(y) else y, increasing=False).x
    padded = np.concatenate([[np.nan], y, [np.nan]])
    mean = np.nanmean(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)
    return isotonic_regression(mean, increasing=False).x


def plateau_noise(curves: list[np.ndarray]) -> float:
    """Per-evaluation noise (standard deviation, log score) of the curves' second halves (whole curves
    when a half has fewer than 3 evaluations), pooled: the second-difference estimator of Gasser, Sroka &
    Jennen-Steinmetz (1986), which a locally linear trend does not inflate:
    sigma^2 = mean((y[i-1] - 2 y[i] + y[i+1])^2) / 6. 0 when no curve has 3 evaluations."""
    diffs = [np.diff(c[len(c) // 2 - 1 :] if len(c) // 2 + 1 >= 3 else c, 2) for c in curves if len(c) >= 3]
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    return float(np.sqrt(np.mean(d**2) / 6)) if len(d) else 0.0


@dataclass
class Reading:
    """One level in one seed."""

    level: float  # the score (not log)
    ref_step: float  # where the reference's smoothed curve reaches the level
    step: float | None  # the run's crossing; None when censored
    speedup: float  # the value that enters the summary (a bound's value when `bound` is set)
    bound: str | None  # None: a point estimate; ">=": reached before the second evaluation; "<": censored
    informative: bool
    why: str  # why not informative, or ""


def readings(
    ref: tuple[np.ndarray, np.ndarray],
    run: tuple[np.ndarray, np.ndarray],
    noise: float,
    planned_steps: float,
    run_diverged: bool = False,
) -> dict[str, Reading]:
    """The speed-up of `run` over `ref` (each (steps, scores), finite scores > 0) at every level of LEVELS."""
    (rs, rv), (us, uv) = ref, run
    rs, us = np.asarray(rs, np.float64), np.asarray(us, np.float64)
    if len(rv) == 0:
        return {}
    ref_s = smooth(np.log(rv))
    run_s = smooth(np.log(uv)) if len(uv) else np.zeros(0)
    out = {}
    for name, frac in LEVELS.items():
        level = float(np.interp(frac * rs[-1], rs, ref_s))
        ref_step = first_reach(rs, ref_s, level)
        if ref_step is None:  # only by rounding: the reference's own curve passes through its level
            ref_step = float(frac * rs[-1])
        why = ""
        if len(rs) < 2 or ref_step < rs[1]:
            why = "the reference reaches it before its second evaluation"
        elif len(run_s) and abs(level - run_s[-1]) < NOISE_MARGIN * noise:
            why = f"the run ends within {NOISE_MARGIN:g} noise of it"
        step = first_reach(us, run_s, level) if len(us) else None
        if step is None:
            last = planned_steps if run_diverged or not len(us) else us[-1]
            speed, bound = ref_step / last, "<"
        elif len(us) > 1 and step < us[1]:
            speed, bound = ref_step / us[1], ">="
        else:
            speed, bound = ref_step / step, None
        out[name] = Reading(float(np.exp(level)), float(ref_step), step, float(speed), bound, not why, why)
    return out


@dataclass
class Summary:
    """One level across seeds."""

    speedups: list[float]  # per seed, bounds at their value
    bounds: list[str | None]
    geomean: float
    low: float | None  # the 95% interval; None with one seed
    high: float | None
    informative: int  # seeds in which the level is informative
    verdict: str


def summarize(per_seed: list[Reading]) -> Summary:
    """The paired summary of one level over the seeds (module docstring)."""
    x = np.log([r.speedup for r in per_seed])
    n = len(x)
    mean = float(x.mean())
    informative = sum(r.informative for r in per_seed)
    low = high = None
    if n >= 2:
        sem = float(x.std(ddof=1)) / np.sqrt(n)
        low, high = (mean, mean) if sem == 0 else stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sem)
        low, high = float(np.exp(low)), float(np.exp(high))
    if informative < n:
        verdict = "within noise"
    elif n < 2:
        verdict = "one seed"
    elif low > 1:  # type: ignore[operator]
        verdict = "faster"
    elif high < 1 or all(r.bound == "<" for r in per_seed):  # type: ignore[operator]
        verdict = "slower"
    else:
        verdict = "no clear difference"
    return Summary(
        [float(v) for v in np.exp(x)], [r.bound for r in per_seed], float(np.exp(mean)), low, high, informative, verdict
    )


def summary_text(level: dict[str, Any]) -> str:
    """One level's summary: '1.62x [1.31, 2.01]'; '~' in front when within noise, '>=' or '<' when every
    seed gave that bound; no interval where there is none (one seed) or it has no width (equal values)."""
    mark = "~" if level["verdict"] == "within noise" else ""
    kinds = set(level["bounds"])
    bound = kinds.pop() or "" if len(kinds) == 1 else ""  # every seed the same kind of bound: say so
    if level["low"] is None or _x(level["low"]) == _x(level["high"]):  # one seed, or every seed the same value
        return f"{mark}{bound}{_x(level['geomean'])}x"
    return f"{mark}{bound}{_x(level['geomean'])}x [{_x(level['low'])}, {_x(level['high'])}]"


def _x(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.3g}"


def headline(levels: dict[str, Summary]) -> tuple[str | None, str]:
    """(level, verdict) at the deepest level informative in every seed; (None, "within noise") if none is."""
    for name in DEEPEST_FIRST:
        s = levels.get(name)
        if s is not None and s.verdict != "within noise":
            return name, s.verdict
    return None, "within noise"


def race(
    ref_curves: list[tuple[np.ndarray, np.ndarray]],
    run_curves: list[tuple[np.ndarray, np.ndarray]],
    planned_steps: float,
    noise: float | None = None,
    diverged: list[bool] | None = None,
) -> dict[str, Any]:
    """Paired seeds (ref_curves[k] with run_curves[k]) -> per-seed readings, per-level summaries, headline.
    `noise` None: plateau_noise of all the given curves."""
    if noise is None:
        noise = plateau_noise([np.log(v) for _, v in [*ref_curves, *run_curves] if len(v)])
    diverged = diverged or [False] * len(ref_curves)
    seeds = [readings(a, b, noise, planned_steps, d) for a, b, d in zip(ref_curves, run_curves, diverged)]
    seeds = [s for s in seeds if s]
    levels = {name: summarize([s[name] for s in seeds]) for name in LEVELS} if seeds else {}
    level, verdict = headline(levels)
    return {
        "noise": noise,
        "seeds": [{k: asdict(r) for k, r in s.items()} for s in seeds],
        "levels": {k: asdict(v) for k, v in levels.items()},
        "headline": {"level": level, "verdict": verdict},
    }
