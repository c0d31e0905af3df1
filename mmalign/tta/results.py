"""``StreamResult``: the per-batch records of one adaptation run and the summaries read from them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamResult:
    """Per-batch records of one run: one entry per (method, batch).

    A record holds ``method, round, domain, batch, n, wrong`` (None when unlabelled), ``entropy``
    (summed over the batch), ``agree`` (samples whose prediction equals the source model's; None
    without a reference), ``changed`` (samples whose prediction differs from the un-adapted model's
    under the same normalisation, the guard's reference; None without one), ``kept`` (samples a filter kept; None for methods without one), ``small``
    (predicted without an update: below ``adapt.min_batch``), ``fallback`` (predicted with the source
    statistics, nothing learned: the guard's fallback) and ``reset`` (the guard reset the method
    after this batch).
    """

    methods: list[str]
    domains: list[str]
    rounds: int
    setting: str
    records: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # adaptation time per method
    images: int = 0  # images seen per method
    complete: bool = True  # False: the run stopped early (``error`` says why); the records are what was measured
    error: str | None = None
    short_batches: dict[str, int] = field(default_factory=lambda: {"merged": 0, "merged_samples": 0})
    resets: list[dict] = field(default_factory=list)  # the guard's resets: method, round, domain, batch, reason

    @property
    def labelled(self) -> bool:
        return bool(self.records) and all(r["wrong"] is not None for r in self.records)

    def _rate(self, key: str, keep, scale: float) -> dict[tuple, float]:
        acc: dict[tuple, list[float]] = {}
        for r in self.records:
            k = keep(r)
            if k is None or r.get(key) is None:
                continue
            a = acc.setdefault(k, [0.0, 0])
            a[0] += r[key]
            a[1] += r["n"]
        return {k: scale * s / n if n else float("nan") for k, (s, n) in acc.items()}

    def _by_domain(self, key: str, round_index: int | None, scale: float) -> dict[str, dict[str, float]]:
        rates = self._rate(key, lambda r: (r["method"], r["domain"])
                           if round_index is None or r["round"] == round_index else None, scale)
        return {m: {d: rates.get((m, d), float("nan")) for d in self.domains} for m in self.methods}

    def _by_round(self, key: str, scale: float) -> dict[str, list[float]]:
        rates = self._rate(key, lambda r: (r["method"], r["round"]), scale)
        return {m: [rates.get((m, k), float("nan")) for k in range(self.rounds)] for m in self.methods}

    def domain_errors(self, round_index: int | None = None) -> dict[str, dict[str, float]]:
        """error % per method and domain, for one round (0-based) or over all rounds (nan: unlabelled)."""
        return self._by_domain("wrong", round_index, 100.0)

    def round_errors(self) -> dict[str, list[float]]:
        """error % per method for each round (all domains pooled)."""
        return self._by_round("wrong", 100.0)

    def domain_entropy(self, round_index: int | None = None) -> dict[str, dict[str, float]]:
        """Mean prediction entropy (nats) per method and domain."""
        return self._by_domain("entropy", round_index, 1.0)

    def round_entropy(self) -> dict[str, list[float]]:
        return self._by_round("entropy", 1.0)

    def round_agreement(self) -> dict[str, list[float]]:
        """% of samples predicted as the source model predicts them, per method and round."""
        return self._by_round("agree", 100.0)

    def domain_signals(self, round_index: int) -> dict[str, dict[str, dict]]:
        """What the stream tells without labels, per method and domain of one round: agreement with the
        source (%), predictions changed against the un-adapted model (%), mean entropy, its trend (mean entropy of the domain's second half of batches minus
        its first half, nats), the filter's kept fraction (%), the guard's resets, the batches it sent
        to the source statistics and the batches predicted without an update."""
        out: dict[str, dict[str, dict]] = {}
        agree = self._by_domain("agree", round_index, 100.0)
        changed = self._by_domain("changed", round_index, 100.0)
        ent = self._by_domain("entropy", round_index, 1.0)
        kept = self._by_domain("kept", round_index, 100.0)
        for m in self.methods:
            out[m] = {}
            for d in self.domains:
                recs = [r for r in self.records if r["method"] == m and r["domain"] == d and r["round"] == round_index]
                half = len(recs) // 2
                first, second = recs[:max(half, 1)], recs[half:]
                trend = float("nan")
                if len(recs) > 1:
                    trend = (sum(r["entropy"] for r in second) / sum(r["n"] for r in second)
                             - sum(r["entropy"] for r in first) / sum(r["n"] for r in first))
                out[m][d] = {"agreement_pct": agree[m][d], "changed_vs_unadapted_pct": changed[m][d],
                             "entropy": ent[m][d], "entropy_trend": trend,
                             "kept_pct": kept[m][d], "resets": sum(r["reset"] for r in recs),
                             "source_fallback_batches": sum(r.get("fallback", False) for r in recs),
                             "unadapted_batches": sum(r["small"] for r in recs)}
        return out

    def throughput(self) -> dict[str, float]:
        return {m: self.images / s if s > 0 else float("nan") for m, s in self.seconds.items()}
