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
from .guard import Guard
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
               small_batch: str = "merge", min_batch: int = 2, result: StreamResult | None = None) -> StreamResult:
    """Adapt every method of ``methods`` ({name: TTAMethod}) along the stream, in lockstep.

    ``setting``: ``continual`` (never reset), ``reset`` (reset at every domain shift) or
    ``episodic`` (reset before every batch). ``rounds`` repeats the whole stream (long-term);
    ``max_batches`` caps batches per domain (smoke tests). ``reference``: the frozen source model the
    agreement is measured against (the ``source`` method's outputs when it runs); ``baseline``: the
    un-adapted model with the same normalisation (a ``norm`` method; the ``norm`` method's outputs when
    it runs), which the guard compares each adapted model with; ``guards``: a ``Guard`` per method,
    reset on collapse.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}; choose one of {list(SETTINGS)}.")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    result = result or StreamResult([], [], rounds, setting)
    result.methods, result.domains, result.rounds, result.setting = list(methods), stream.domain_names, rounds, setting
    result.seconds = {m: 0.0 for m in methods}
    guards = guards or {}
    try:
        _run(methods, stream, setting, rounds, max_batches, device, batch_size, log, on_predictions, reference,
             baseline, guards, small_batch, min_batch, result)
    except BaseException as exc:  # even Ctrl-C: what was measured is kept, and says it is incomplete
        result.complete, result.error = False, f"{type(exc).__name__}: {exc}"
        raise
    return result


def _run(methods, stream, setting, rounds, max_batches, device, batch_size, log, on_predictions, reference, baseline,
         guards, small_batch, min_batch, result: StreamResult) -> None:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for rnd in range(rounds):
        for domain in stream.domain_names:
            if setting == "reset":
                for name, m in methods.items():
                    m.reset()
                    if name in guards:
                        guards[name].restart()
            batches = _merged_batches(stream.domain_batches(domain, batch_size), min_batch, small_batch == "merge",
                                      result.short_batches)
            for b, batch in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                images, labels = batch["image"].to(device), batch["label"].to(device)
                labelled = bool((labels != UNLABELLED).all())
                outputs = {}
                for name, m in methods.items():
                    sync()
                    t0 = time.perf_counter()
                    if setting == "episodic":
                        m.reset()
                    small_before = m.small_batches
                    logits = m(images)
                    pred = logits.argmax(-1)
                    wrong = int((pred != labels).sum()) if labelled else None  # syncs: timing is honest
                    result.seconds[name] += time.perf_counter() - t0
                    outputs[name] = (logits.detach().float().softmax(-1), pred, wrong, m.small_batches > small_before)
                ref = _probs(outputs, "source", reference, images)
                base = _probs(outputs, "norm", baseline, images) if guards else None
                for name, (probs, pred, wrong, small) in outputs.items():
                    m = methods[name]
                    reason = guards[name].update(probs, base) if name in guards and not small else None
                    if reason is not None:
                        m.reset()
                        guards[name].restart()
                        result.resets.append({"method": name, "round": rnd + 1, "domain": domain, "batch": b,
                                              "reason": reason})
                        if log is not None:
                            log(f"[guard] {name} reset at round {rnd + 1} {domain} batch {b}: {reason}")
                    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).sum())
                    kept = m.last.get("kept")
                    result.records.append({
                        "method": name, "round": rnd, "domain": domain, "batch": b, "n": len(labels), "wrong": wrong,
                        "entropy": entropy, "agree": None if ref is None else int((pred == ref.argmax(-1)).sum()),
                        "changed": None if base is None else int((pred != base.argmax(-1)).sum()),
                        "kept": None if kept is None else kept * len(labels), "small": small,
                        "reset": reason is not None})
                    if on_predictions is not None:
                        on_predictions({"method": name, "round": rnd, "domain": domain, "keys": batch.get("key"),
                                        "pred": pred.tolist(), "confidence": probs.max(-1).values.tolist(),
                                        "label": labels.tolist() if labelled else None})
                result.images += len(labels)
            if log is not None:
                log(f"round {rnd + 1}/{rounds} {domain}: " + _progress(result, rnd, domain, list(methods)))


def _probs(outputs: dict, name: str, model, images: torch.Tensor) -> torch.Tensor | None:
    """Softmax of the method ``name`` when it runs in lockstep, else of ``model`` (None: neither)."""
    if name in outputs:
        return outputs[name][0]
    if model is None:
        return None
    with torch.no_grad():
        return model(images).float().softmax(-1)


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
