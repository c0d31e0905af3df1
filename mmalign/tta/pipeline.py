"""The adaptation pipeline, once: source statistics, methods, the stream loop, the report.

``python -m mmalign adapt``, ``scripts/bench_tta.py`` and ``mmalign tta stats`` all call these
functions, so what a benchmark measures is what the command runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

from .cafa_stats import SourceStats, compute_source_stats
from .methods import build_method
from .module import TTAModel
from .guard import Guard
from .results import StreamResult
from .stream import run_stream


def labelled_batches(datamodule, max_samples: int | None, batch_size: int = 256) -> Iterable[dict]:
    """Labelled source samples (``shards.train``, eval transform) of an image-label datamodule."""
    from datamodules.shards import expand_shards
    from datamodules.eval_sets import EvalLoader, InMemoryDataset

    if datamodule.shards.get("fit") is None:
        raise ValueError("CAFA statistics need labelled source data: set data.init_args.shards.train "
                         "(e.g. digits/train) or give a precomputed cafa_stats file.")
    ds = InMemoryDataset(expand_shards(datamodule.shards["fit"], "shards.train"), datamodule._decode_eval,
                         max_samples)
    return EvalLoader(ds, datamodule.collate, "source", datamodule.health, batch_size=batch_size,
                      num_workers=datamodule.num_workers)


def source_statistics(model: TTAModel, datamodule, out_dir: str, device, log: Callable[[str], None] = print,
                      max_samples: int | None = None) -> SourceStats:
    """CAFA's source Gaussians for ``model``: loaded from its statistics file when that file was
    computed from the same source checkpoint (same bytes), else computed and saved.

    A statistics file given explicitly (``cafa_stats``) that belongs to another checkpoint is refused;
    the default one beside the checkpoint is recomputed.
    """
    path = model.stats_path(out_dir)
    checkpoint = model.source_checkpoint
    if os.path.isfile(path):
        stats = SourceStats.load(path)
        if stats.matches(model.source_digest):
            log(f"[adapt] CAFA statistics from {path}")
            return stats
        where = (stats.source or {}).get("path", "an unrecorded checkpoint")
        if model.cfg.cafa.stats:
            raise ValueError(f"cafa_stats '{path}' were computed from {where}, not from source_checkpoint "
                             f"'{checkpoint}' as it is now. Remove cafa_stats (adapt recomputes them) or point it at "
                             "this checkpoint's statistics.")
        log(f"[adapt] {path} describes {where}, not {checkpoint} as it is now: recomputing")
    stats = compute_source_stats(model.source, labelled_batches(datamodule, max_samples), model.num_classes,
                                 model.cfg.cafa.covariance, model.cfg.cafa.shrinkage, max_samples, device)
    if checkpoint:
        stats.source = {"path": os.path.abspath(checkpoint), "sha256": model.source_digest}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stats.save(path)
    log(f"[adapt] CAFA statistics ({stats.covariance}, {stats.meta['num_samples']} samples) -> {path}")
    return stats


def check_labels_fit(model: TTAModel, datamodule) -> None:
    """Make the stream validate its labels against the model's classes (an out-of-range label is a
    wrong dataset or label_key, which would otherwise just show up as ~100% error)."""
    if hasattr(datamodule, "num_classes"):
        given = datamodule.num_classes
        if given is not None and given != model.num_classes:
            raise ValueError(f"data.init_args.label.num_classes={given} but the source model has {model.num_classes} "
                             "classes; drop label.num_classes (it is taken from the model) or fix the source "
                             "checkpoint.")
        datamodule.num_classes = model.num_classes


def source_fisher(model: TTAModel, datamodule, device, log: Callable[[str], None] = print) -> dict | None:
    """EATA's Fisher information from the labelled source split's images (labels unused); None when
    the regulariser is off (``eata.fisher_beta: 0``)."""
    from .eata import fisher_information

    e = model.cfg.eata
    if e.fisher_beta == 0:
        return None
    if datamodule.shards.get("fit") is None:
        raise ValueError("eata's Fisher regulariser needs source images: set data.init_args.shards.train (e.g. "
                         "digits/train; labels are not used), or eata.fisher_beta: 0 to run without it (ETA).")
    fisher = fisher_information(model.source, model.cfg, labelled_batches(datamodule, e.fisher_samples, e.fisher_batch),
                                device)
    log(f"[adapt] EATA Fisher information from up to {e.fisher_samples} source images (batch {e.fisher_batch})")
    return fisher


def adapt(model: TTAModel, datamodule, setting: str = "continual", rounds: int = 1, max_batches: int | None = None,
          out_dir: str = "runs/adapt", device: str | torch.device = "cpu", batch_size: int | None = None,
          log: Callable[[str], None] = print, stats: SourceStats | None = None,
          on_predictions: Callable[[dict], None] | None = None, result: StreamResult | None = None,
          methods: dict | None = None) -> tuple[StreamResult, dict]:
    """Run every method of ``model`` along ``datamodule``'s domains (a ``DomainStream``); returns the
    result and the methods. ``result`` (filled in place) and ``methods`` (filled once built) let the
    caller report what was measured when something fails midway."""
    if datamodule.labelled:
        check_labels_fit(model, datamodule)
    names = model.hparams.methods
    if "cafa" in names and stats is None:
        stats = source_statistics(model, datamodule, out_dir, device, log, datamodule.source_max_samples)
    fisher = source_fisher(model, datamodule, device, log) if "eata" in names else None
    built = {n: m.to(device) for n, m in model.build_methods(stats, fisher).items()}
    if methods is not None:
        methods.update(built)
    spec = model.guard_spec
    guards = {n: Guard(spec) for n, m in built.items() if m.trains}
    fallback = [n for n, m in built.items() if m.norm is not None] if spec.source_fallback else []
    # the guard's reference: the un-adapted model under the same normalisation
    baseline = build_method("norm", model.source, model.cfg).to(device) if guards or fallback else None
    a = model.cfg.adapt
    result = run_stream(built, datamodule, setting, rounds, max_batches, device, batch_size=batch_size, log=log,
                        on_predictions=on_predictions, reference=model.source.to(device), baseline=baseline,
                        guards=guards, fallback=fallback,
                        small_batch=a.small_batch, min_batch=a.min_batch, result=result,
                        min_class_spread=spec.min_class_spread if spec.source_fallback else 0.0)
    return result, built


def method_summary(methods: dict) -> dict:
    """What each method did beyond its errors: updates, skipped updates, batches predicted without an
    update (below adapt.min_batch), the filters' kept fraction, SAR's model recoveries."""
    return {"updates": {n: m.updates for n, m in methods.items()},
            "skipped_updates": {n: m.skipped for n, m in methods.items()},
            "unadapted_small_batches": {n: m.small_batches for n, m in methods.items()},
            "source_fallback_batches": {n: m.fallbacks for n, m in methods.items()},
            "filter_kept_fraction": {n: m.kept_fraction for n, m in methods.items() if hasattr(m, "kept_fraction")},
            "sar_recoveries": {n: m.recoveries for n, m in methods.items() if hasattr(m, "recoveries")}}
