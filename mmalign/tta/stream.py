"""The loop that adapts along a stream of domains, and what it records.

``run_stream`` feeds every batch to all methods in lockstep (each batch is decoded once) and records,
per method and batch, the errors (when the batch is labelled), the summed prediction entropy (always:
the one signal an unlabelled stream has) and the adaptation time; ``on_predictions`` receives each
batch's predictions (key, class, confidence) for writing.

The streams themselves (corrupted benchmark domains, your own data) are in ``mmalign.tta.domains``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .domains import UNLABELLED, CorruptionStream, DomainStream, TargetStream  # noqa: F401 (re-exported)

SETTINGS = ("continual", "reset", "episodic")


@dataclass
class StreamResult:
    """Per-batch records of one run: one entry per (method, batch)."""

    methods: list[str]
    domains: list[str]
    rounds: int
    setting: str
    records: list[dict] = field(default_factory=list)  # method, round, domain, batch, n, wrong|None, entropy
    seconds: dict[str, float] = field(default_factory=dict)  # adaptation time per method
    images: int = 0  # images seen per method

    @property
    def labelled(self) -> bool:
        return bool(self.records) and all(r["wrong"] is not None for r in self.records)

    def _rate(self, key: str, keep, scale: float) -> dict[tuple, float]:
        acc: dict[tuple, list[float]] = {}
        for r in self.records:
            k = keep(r)
            if k is None or r[key] is None:
                continue
            a = acc.setdefault(k, [0.0, 0])
            a[0] += r[key]
            a[1] += r["n"]
        return {k: scale * s / n if n else float("nan") for k, (s, n) in acc.items()}

    def domain_errors(self, round_index: int | None = None) -> dict[str, dict[str, float]]:
        """error % per method and domain, for one round (0-based) or over all rounds (nan: unlabelled)."""
        rates = self._rate("wrong", lambda r: (r["method"], r["domain"])
                           if round_index is None or r["round"] == round_index else None, 100.0)
        return {m: {d: rates.get((m, d), float("nan")) for d in self.domains} for m in self.methods}

    def round_errors(self) -> dict[str, list[float]]:
        """error % per method for each round (all domains pooled)."""
        rates = self._rate("wrong", lambda r: (r["method"], r["round"]), 100.0)
        return {m: [rates.get((m, k), float("nan")) for k in range(self.rounds)] for m in self.methods}

    def domain_entropy(self, round_index: int | None = None) -> dict[str, dict[str, float]]:
        """Mean prediction entropy (nats) per method and domain."""
        rates = self._rate("entropy", lambda r: (r["method"], r["domain"])
                           if round_index is None or r["round"] == round_index else None, 1.0)
        return {m: {d: rates.get((m, d), float("nan")) for d in self.domains} for m in self.methods}

    def round_entropy(self) -> dict[str, list[float]]:
        rates = self._rate("entropy", lambda r: (r["method"], r["round"]), 1.0)
        return {m: [rates.get((m, k), float("nan")) for k in range(self.rounds)] for m in self.methods}

    def throughput(self) -> dict[str, float]:
        return {m: self.images / s if s > 0 else float("nan") for m, s in self.seconds.items()}


def run_stream(methods: dict, stream: DomainStream, setting: str = "continual", rounds: int = 1,
               max_batches: int | None = None, device: str | torch.device = "cpu",
               batch_size: int | None = None, log=None,
               on_predictions: Callable[[dict], None] | None = None) -> StreamResult:
    """Adapt every method of ``methods`` ({name: TTAMethod}) along the stream, in lockstep.

    ``setting``: ``continual`` (never reset), ``reset`` (reset at every domain shift) or
    ``episodic`` (reset before every batch). ``rounds`` repeats the whole stream (long-term);
    ``max_batches`` caps batches per domain (smoke tests).
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}; choose one of {list(SETTINGS)}.")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    result = StreamResult(list(methods), stream.domain_names, rounds, setting)
    result.seconds = {m: 0.0 for m in methods}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for rnd in range(rounds):
        for domain in stream.domain_names:
            if setting == "reset":
                for m in methods.values():
                    m.reset()
            for b, batch in enumerate(stream.domain_batches(domain, batch_size)):
                if max_batches is not None and b >= max_batches:
                    break
                images, labels = batch["image"].to(device), batch["label"].to(device)
                labelled = bool((labels != UNLABELLED).all())
                for name, m in methods.items():
                    sync()
                    t0 = time.perf_counter()
                    if setting == "episodic":
                        m.reset()
                    logits = m(images)
                    pred = logits.argmax(-1)
                    wrong = int((pred != labels).sum()) if labelled else None  # syncs: timing is honest
                    result.seconds[name] += time.perf_counter() - t0
                    probs = logits.detach().float().softmax(-1)
                    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).sum())
                    result.records.append({"method": name, "round": rnd, "domain": domain, "batch": b,
                                           "n": len(labels), "wrong": wrong, "entropy": entropy})
                    if on_predictions is not None:
                        conf = probs.max(-1).values
                        on_predictions({"method": name, "round": rnd, "domain": domain, "keys": batch.get("key"),
                                        "pred": pred.tolist(), "confidence": conf.tolist(),
                                        "label": labels.tolist() if labelled else None})
                result.images += len(labels)
            if log is not None:
                log(f"round {rnd + 1}/{rounds} {domain}: " + _progress(result, rnd, domain, list(methods)))
    return result


def _progress(result: StreamResult, rnd: int, domain: str, names: list[str]) -> str:
    recs = [r for r in result.records if r["round"] == rnd and r["domain"] == domain]
    out = []
    for n in names:
        mine = [r for r in recs if r["method"] == n]
        total = max(1, sum(r["n"] for r in mine))
        if mine and all(r["wrong"] is not None for r in mine):
            out.append(f"{n} {100.0 * sum(r['wrong'] for r in mine) / total:.1f}%")
        else:
            out.append(f"{n} H={sum(r['entropy'] for r in mine) / total:.3f}")
    return "  ".join(out)


def check_methods(names: Sequence[str]) -> list[str]:
    from .methods import METHODS

    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise ValueError(f"methods {bad or names!r} invalid; choose from {list(METHODS)}.")
    return list(names)
