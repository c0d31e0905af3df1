"""The loop that adapts along a stream of domains, and what it records.

``run_stream`` feeds every batch to all methods in lockstep (each batch is decoded once) and records,
per method and batch, the errors (when the batch is labelled), the summed prediction entropy, the
agreement with the frozen source model, the filter's kept samples and the guard's resets (the
label-free signals of ``mmalign.tta.guard``), and the adaptation time; ``on_predictions`` receives each
batch's predictions (key, class, confidence) for writing.

A domain's short last batch (fewer than ``min_batch`` samples, e.g. 201 images at batch 200) joins
the batch before it with ``small_batch="merge"``; every merged or unadapted batch is counted. The
``result`` object is filled in place: when anything fails after the stream started, it holds every
batch measured so far, marked ``complete=False`` with the error, and the caller still writes it.

The streams themselves (corrupted benchmark domains, your own data) are in ``mmalign.tta.domains``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch

from .domains import UNLABELLED, CorruptionStream, DomainStream, TargetStream  # noqa: F401 (re-exported)
from .guard import Guard, class_spread
from .results import StreamResult

SETTINGS = ("continual", "reset", "episodic")


def _merged_batches(batches: Iterator[dict], min_batch: int, merge: bool, counter: dict) -> Iterator[dict]:
    """The batches of one domain; with ``merge`` a batch smaller than ``min_batch`` joins the one before."""
    prev = None
    for batch in batches:
        if prev is not None and merge and len(batch["label"]) < min_batch:
            counter["merged"] += 1
            counter["merged_samples"] += len(batch["label"])
            prev = {"image": torch.cat([prev["image"], batch["image"]]), "label": torch.cat([prev["label"], batch["label"]]),
                    **({"key": list(prev["key"]) + list(batch["key"])} if prev.get("key") is not None else {})}
            continue
        if prev is not None:
            yield prev
        prev = batch
    if prev is not None:
        yield prev


def run_stream(methods: dict, stream: DomainStream, setting: str = "continual", rounds: int = 1,
               max_batches: int | None = None, device: str | torch.device = "cpu",
               batch_size: int | None = None, log=None, on_predictions: Callable[[dict], None] | None = None,
               reference: torch.nn.Module | None = None, baseline=None, guards: dict[str, Guard] | None = None,
               fallback: Sequence[str] = (), small_batch: str = "merge", min_batch: int = 2,
               result: StreamResult | None = None, min_class_spread: float = 0.0) -> StreamResult:
    """Adapt every method of ``methods`` ({name: TTAMethod}) along the stream, in lockstep.

    ``setting``: ``continual`` (never reset), ``reset`` (reset at every domain shift) or
    ``episodic`` (reset before every batch). ``rounds`` repeats the whole stream (long-term);
    ``max_batches`` caps batches per domain (smoke tests). ``reference``: the frozen source model the
    agreement is measured against (the ``source`` method's outputs when it runs); ``baseline``: the
    un-adapted model under the methods' normalisation (a ``norm`` method), which the guard compares
    each adapted model with; ``guards``: a ``Guard`` per method, reset on collapse; ``fallback``: the
    methods that take a batch with the source statistics, and do not learn from it, when the baseline
    is less certain on it than the source model, or when the source model's predictions spread over the
    classes less than ``min_class_spread`` of a class-balanced batch's (``guard.source_fallback``,
    ``guard.min_class_spread``).
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}; choose one of {list(SETTINGS)}.")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    if (guards or fallback) and baseline is None:
        raise ValueError("the guard and the source fallback need a baseline (the un-adapted norm method).")
    if fallback and reference is None and "source" not in methods:
        raise ValueError("the source fallback needs the source model (reference) to compare with.")
    result = result or StreamResult([], [], rounds, setting)
    result.methods, result.domains, result.rounds, result.setting = list(methods), stream.domain_names, rounds, setting
    result.seconds = {m: 0.0 for m in methods}
    loop = _Loop(methods, device, reference, baseline, guards or {}, set(fallback), on_predictions, log, result,
                 min_class_spread)
    try:
        for rnd in range(rounds):
            for domain in stream.domain_names:
                if setting == "reset":
                    loop.reset_all()
                batches = _merged_batches(stream.domain_batches(domain, batch_size), min_batch,
                                          small_batch == "merge", result.short_batches)
                for b, batch in enumerate(batches):
                    if max_batches is not None and b >= max_batches:
                        break
                    loop.batch(rnd, domain, b, batch, episodic=setting == "episodic")
                if log is not None:
                    log(f"round {rnd + 1}/{rounds} {domain}: " + _progress(result, rnd, domain, list(methods)))
    except BaseException as exc:  # even Ctrl-C: what was measured is kept, and says it is incomplete
        result.complete, result.error = False, f"{type(exc).__name__}: {exc}"
        raise
    return result


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def _softmax(model, images: torch.Tensor) -> torch.Tensor | None:
    if model is None:
        return None
    with torch.no_grad():
        return model(images).float().softmax(-1)


class _Loop:
    """One batch for every method: the references first, then each method, then guard and records."""

    def __init__(self, methods, device, reference, baseline, guards, fallback, on_predictions, log, result,
                 min_class_spread=0.0):
        self.methods, self.device, self.reference, self.baseline = methods, device, reference, baseline
        self.min_class_spread = min_class_spread
        self.guards, self.fallback, self.on_predictions, self.log = guards, fallback, on_predictions, log
        self.result = result
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def reset_all(self) -> None:
        for name, m in self.methods.items():
            m.reset()
            if name in self.guards:
                self.guards[name].restart()

    def _run(self, name, m, images, labels, labelled, episodic, source_stats):
        self.sync()
        t0 = time.perf_counter()
        if episodic:
            m.reset()
        small_before = m.small_batches
        logits = m(images, source_stats=source_stats)
        pred = logits.argmax(-1)
        wrong = int((pred != labels).sum()) if labelled else None  # syncs: timing is honest
        self.result.seconds[name] += time.perf_counter() - t0
        return logits.detach().float().softmax(-1), pred, wrong, m.small_batches > small_before

    def batch(self, rnd: int, domain: str, b: int, batch: dict, episodic: bool) -> None:
        images, labels = batch["image"].to(self.device), batch["label"].to(self.device)
        labelled = bool((labels != UNLABELLED).all())
        outputs = {}
        if "source" in self.methods:  # stateless: its outputs are the reference
            outputs["source"] = self._run("source", self.methods["source"], images, labels, labelled, False, False)
        ref = outputs["source"][0] if "source" in outputs else _softmax(self.reference, images)
        base = _softmax(self.baseline, images)
        # the test-batch statistics are used only when they leave the un-adapted model at most as
        # uncertain as the source statistics do (on a mild shift or a class-sorted batch they do not),
        # and when the batch is not one of a few classes (its statistics would carry its labels)
        use_source = bool(self.fallback) and (
            float(_entropy(base).mean()) > float(_entropy(ref).mean())
            or (self.min_class_spread > 0 and class_spread(ref.argmax(-1), ref.shape[-1]) < self.min_class_spread))
        for name, m in self.methods.items():
            if name != "source":
                outputs[name] = self._run(name, m, images, labels, labelled, episodic,
                                          use_source and name in self.fallback)
        for name, (probs, pred, wrong, small) in outputs.items():
            self._record(rnd, domain, b, batch, name, probs, pred, wrong, small, ref, base,
                         use_source and name in self.fallback, labels, labelled)
        self.result.images += len(labels)

    def _record(self, rnd, domain, b, batch, name, probs, pred, wrong, small, ref, base, fell_back, labels, labelled):
        m = self.methods[name]
        reason = None
        if name in self.guards and not small and not fell_back:
            reason = self.guards[name].update(probs, base)
        if reason is not None:
            m.reset()
            self.guards[name].restart()
            self.result.resets.append({"method": name, "round": rnd + 1, "domain": domain, "batch": b, "reason": reason})
            if self.log is not None:
                self.log(f"[guard] {name} reset at round {rnd + 1} {domain} batch {b}: {reason}")
        kept = None if fell_back else m.last.get("kept")
        self.result.records.append({
            "method": name, "round": rnd, "domain": domain, "batch": b, "n": len(labels), "wrong": wrong,
            "entropy": float(_entropy(probs).sum()),
            "agree": None if ref is None else int((pred == ref.argmax(-1)).sum()),
            "changed": None if base is None else int((pred != base.argmax(-1)).sum()),
            "kept": None if kept is None else kept * len(labels), "small": small, "fallback": fell_back,
            "reset": reason is not None})
        if self.on_predictions is not None:
            self.on_predictions({"method": name, "round": rnd, "domain": domain, "keys": batch.get("key"),
                                 "pred": pred.tolist(), "confidence": probs.max(-1).values.tolist(),
                                 "label": labels.tolist() if labelled else None})


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
    if len(set(names)) != len(names):
        raise ValueError(f"methods {list(names)} name a method twice; each runs once.")
    return list(names)
