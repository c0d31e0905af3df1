"""Seed statistics and result files, shared by every ``scripts/bench_*.py``.

``interval(values)`` is the mean with a 95% confidence interval (Student t over the seeds);
``compare(a, b)`` says whether two arms differ (Welch's t-test, two-sided, p < 0.05) and by how
much; ``against(values, target)`` whether a target (an accuracy floor, a time-ratio ceiling) is met
(one-sample t-test); ``cell`` formats ``mean ± half-width``. Benchmarks call ``save(path, payload)`` so every
result lands under ``outputs/bench/`` (git-ignored) unless told otherwise, and ``load_rows`` to join the per-seed
rows of earlier result files (seeds added without re-running the old ones).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float  # 95% CI half-width (nan with fewer than 2 values)
    n: int
    sd: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def _t95(dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def interval(values) -> Interval:
    """Mean and 95% confidence interval of ``values`` (one per seed)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return Interval(float("nan"), float("nan"), 0, float("nan"))
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return Interval(mean, float("nan"), len(xs), float("nan"))
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return Interval(mean, _t95(len(xs) - 1) * sd / math.sqrt(len(xs)), len(xs), sd)


@dataclass(frozen=True)
class Comparison:
    diff: float  # mean(a) - mean(b)
    p_value: float
    significant: bool
    overlap: bool  # the two 95% intervals overlap (then 5 seeds are wanted)

    def verdict(self, better: str = "higher", names: tuple[str, str] = ("A", "B")) -> str:
        """``'<name> better (p=...)'`` or ``'no significant difference (p=...)'``; ``names`` are arms a and b."""
        if not self.significant:
            return f"no significant difference (p={self.p_value:.2f})"
        a_better = self.diff > 0 if better == "higher" else self.diff < 0
        return f"{names[0] if a_better else names[1]} better (p={self.p_value:.3f})"


def compare(a, b, alpha: float = 0.05, paired: bool = False) -> Comparison:
    """Welch's two-sided t-test between two arms' per-seed values; ``paired=True``: the paired t-test
    (``a[i]`` and ``b[i]`` come from the same seed, e.g. one arm early and late in a stream)."""
    from scipy import stats

    ia, ib = interval(a), interval(b)
    if ia.n < 2 or ib.n < 2:
        return Comparison(ia.mean - ib.mean, float("nan"), False, True)
    if paired:
        if ia.n != ib.n:
            raise ValueError(f"a paired comparison needs as many values in each arm, got {ia.n} and {ib.n}")
        res = stats.ttest_rel([float(x) for x in a], [float(x) for x in b])
    else:
        res = stats.ttest_ind([float(x) for x in a], [float(x) for x in b], equal_var=False)
    p = float(res.pvalue) if not math.isnan(float(res.pvalue)) else 1.0
    overlap = not (ia.high < ib.low or ib.high < ia.low)
    return Comparison(ia.mean - ib.mean, p, p < alpha, overlap)


@dataclass(frozen=True)
class Target:
    target: float
    better: str  # "higher": values should be >= target; "lower": <= target
    interval: Interval
    p_value: float  # one-sample two-sided t-test of mean == target (nan with < 2 values)

    @property
    def verdict(self) -> str:
        """``holds`` (the whole 95% interval on the right side), ``fails`` (the whole interval on the
        wrong side) or ``not shown`` (the interval contains the target: more seeds would be needed)."""
        i = self.interval
        if i.n < 2:
            ok = i.mean >= self.target if self.better == "higher" else i.mean <= self.target
            return f"{'met' if ok else 'missed'} by one run (no interval)"
        lo_ok = i.low >= self.target if self.better == "higher" else i.high <= self.target
        hi_bad = i.high < self.target if self.better == "higher" else i.low > self.target
        return "holds" if lo_ok else "fails" if hi_bad else "not shown (interval contains the target)"


def against(values, target: float, better: str = "higher") -> Target:
    """Is ``target`` met by the per-seed ``values``? See ``Target.verdict``."""
    from scipy import stats

    i = interval(values)
    p = float("nan")
    if i.n >= 2 and i.sd > 0:
        p = float(stats.ttest_1samp([float(v) for v in values], target).pvalue)
    return Target(float(target), better, i, p)


def cell(values, digits: int = 1, scale: float = 1.0) -> str:
    """``mean ± half-width`` of the 95% interval (just the mean for one seed)."""
    i = interval([v * scale for v in values])
    if i.n == 0:
        return "n/a"
    if i.n < 2:
        return f"{i.mean:.{digits}f}"
    return f"{i.mean:.{digits}f} ± {i.half_width:.{digits}f}"


def save(path: str, payload: dict) -> str:
    """Write ``payload`` as strict JSON (NaN -> null), creating the folder; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def clean(o):
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, Target):
            return clean({**asdict(o), "verdict": o.verdict})
        if isinstance(o, (Interval, Comparison)):
            return clean(asdict(o))
        return o

    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=2, allow_nan=False)
    print(f"wrote {path}")
    return path


def load_rows(paths, *keys: str, match: dict | None = None) -> list:
    """The per-seed rows of earlier ``save``d results, concatenated: ``payload[keys[0]][keys[1]]...`` of each file.

    ``match``: the recipe the rows must share with the run that joins them (steps, data size, model
    size...). Each key is looked up in the row itself, else in the file's ``config``; a file run with
    another value, or that did not record the key, is refused: seeds of different recipes must not be
    averaged into one interval."""
    rows = []
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        node = payload
        for k in keys:
            node = node[k]
        config = payload.get("config") or {}
        for row in node:
            for key, want in (match or {}).items():
                have = row.get(key, config.get(key, "<not recorded>"))
                if have != want:
                    raise ValueError(f"{path}: seed {row.get('seed')} was run with {key}={have!r}, this run uses "
                                     f"{want!r}; only runs of the same recipe can be merged (rerun those seeds, or "
                                     "run with the same settings).")
        rows += node
    return rows
