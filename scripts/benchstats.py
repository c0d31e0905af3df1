"""Seed statistics, the evidence protocol and result files, shared by every ``scripts/bench_*.py``.

The protocol (declared here once; ``docs/benchmarks.md`` states it):

- **Seeds are fixed before running**: ``REPORT_SEEDS`` (5) unless a benchmark documents another count
  up front. More seeds are *pooled* with the first ones, never swapped for them.
- **Tuning runs use ``TUNING_SEEDS``**, which are never reported; recipes are chosen on val and reported
  on test / held-out, read once per recipe.
- **A failed seed stops the summary** (``MissingSeedError``): a None/NaN value never silently vanishes.
- **Paired tests** where arms share seeds or streams (``compare(paired=True)``).
- **Holm correction** across the claims of one table (``ClaimTable``); each claim's verdict is
  ``holds``, ``fails`` or ``not shown``.

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


#: the seeds every benchmark reports by default; tuning uses TUNING_SEEDS, which are never reported
REPORT_SEEDS = (0, 1, 2, 3, 4)
TUNING_SEEDS = (100, 101, 102)


class MissingSeedError(ValueError):
    """A seed's value is None or NaN: the run failed or diverged, and the summary must say so."""


def _values(values, what: str = "values") -> list[float]:
    xs = []
    for i, v in enumerate(values):
        if v is None or math.isnan(float(v)):
            raise MissingSeedError(f"{what}: entry {i} is {v!r} (a failed or diverged seed). Rerun that seed, or "
                                   "report the failure; a summary never drops a seed silently.")
        xs.append(float(v))
    return xs


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
    """Mean and 95% confidence interval of ``values`` (one per seed); a None/NaN seed raises
    ``MissingSeedError``."""
    xs = _values(values)
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
        if math.isnan(self.p_value):
            return "no difference (identical values)" if self.diff == 0 else "not testable (fewer than 2 seeds)"
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
    p = float(res.pvalue)  # NaN when every difference is 0: reported as such, never turned into 1.0
    overlap = not (ia.high < ib.low or ib.high < ia.low)
    return Comparison(ia.mean - ib.mean, p, bool(p < alpha), overlap)


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
        p = float(stats.ttest_1samp(_values(values), target).pvalue)
    return Target(float(target), better, i, p)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone); NaN p-values stay NaN and do not count."""
    valid = sorted(((p, k) for k, p in p_values.items() if not math.isnan(p)))
    m, out, running = len(valid), {k: float("nan") for k in p_values}, 0.0
    for i, (p, k) in enumerate(valid):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


@dataclass
class ClaimTable:
    """The claims of one table, decided together under Holm correction.

    ``better(name, a, b, paired=...)``: "arm a is better than arm b" (``higher`` or ``lower`` is better);
    ``target(name, values, target, better)``: a floor or ceiling. ``decide()`` returns one row per claim:
    ``holds`` (adjusted p < alpha in the claimed direction; for a target, the whole 95% interval on the
    right side, at the Holm-adjusted level), ``fails`` (significant the other way / the whole interval on
    the wrong side) or ``not shown``.
    """

    alpha: float = 0.05
    claims: list = None

    def __post_init__(self) -> None:
        self.claims = []

    def better(self, name: str, a, b, higher_is_better: bool = True, paired: bool = False) -> None:
        c = compare(a, b, self.alpha, paired=paired)
        sign = 1 if higher_is_better else -1
        self.claims.append({"claim": name, "kind": "better", "diff": c.diff, "p": c.p_value,
                            "direction_ok": sign * c.diff > 0, "paired": paired,
                            "a": interval(a), "b": interval(b)})

    def target(self, name: str, values, target: float, better: str = "higher") -> None:
        t = against(values, target, better)
        right = (t.interval.mean >= target) if better == "higher" else (t.interval.mean <= target)
        self.claims.append({"claim": name, "kind": "target", "diff": t.interval.mean - target, "p": t.p_value,
                            "direction_ok": right, "interval": t.interval, "target": target, "better": better})

    def decide(self) -> list[dict]:
        adjusted = holm({str(i): c["p"] for i, c in enumerate(self.claims)})
        rows = []
        for i, c in enumerate(self.claims):
            p_adj = adjusted[str(i)]
            if math.isnan(p_adj):
                verdict = "not shown"
            elif p_adj < self.alpha:
                verdict = "holds" if c["direction_ok"] else "fails"
            else:
                verdict = "not shown"
            rows.append({**c, "p_holm": p_adj, "verdict": verdict})
        return rows

    def print(self, title: str = "claims") -> list[dict]:
        rows = self.decide()
        print(f"\n{title} (Holm over {len(rows)} claims, alpha {self.alpha})")
        for r in rows:
            p = "n/a" if math.isnan(r["p"]) else f"{r['p']:.3g}"
            ph = "n/a" if math.isnan(r["p_holm"]) else f"{r['p_holm']:.3g}"
            print(f"  {r['verdict']:<10} {r['claim']}  (diff {r['diff']:+.4g}, p {p}, Holm p {ph})")
        return rows


def cell(values, digits: int = 1, scale: float = 1.0) -> str:
    """``mean ± half-width`` of the 95% interval (just the mean for one seed)."""
    i = interval([None if v is None else v * scale for v in values])
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
