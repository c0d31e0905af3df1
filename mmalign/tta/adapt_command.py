"""``python -m mmalign adapt -c CONFIG``: test-time adaptation along a shifted test stream.

Kept light at import (the CLI imports it to build ``--help``): everything heavy is imported inside
the command.
"""

from __future__ import annotations


def adapt(trainer, model, datamodule, setting: str = "continual", rounds: int = 1, out_dir: str | None = None,
          save_adapted: bool = False, max_batches: int | None = None, plot: bool = True,
          write_predictions: bool | None = None) -> dict:
    """Adapt a trained classifier at test time (source/norm/tent/tent_filter/cafa/eata/sar) along a stream of domains.

    The adaptation loop runs here, not in a Lightning loop: Lightning evaluates under
    ``torch.inference_mode``, which forbids the gradient steps TENT and CAFA take on test data.
    The command enables gradients itself (``inference_mode(False)`` + ``enable_grad``) around each
    step, on the device the trainer picked (``trainer.accelerator``); other trainer options do not
    apply. Outputs in ``out_dir`` (checked writable before anything runs): ``results.json``,
    ``errors.csv``, ``error_stream.png`` and, with ``save_adapted``, ``adapted_<method>.ckpt`` (the
    source checkpoint is never written), and ``predictions.jsonl`` (one line per sample and method:
    key, class, confidence). When the run fails after the stream started, ``results.json`` and
    ``errors.csv`` still hold every batch measured, with ``complete: false`` and the error.

    The stream is ``data.class_path: mmalign.tta.CorruptionStream`` (the corruption benchmark) or
    ``mmalign.tta.TargetStream`` (your own shards or image folder, labelled or not).

    Args:
        setting: ``continual`` (never reset), ``reset`` (reset at every domain shift) or
            ``episodic`` (reset before every batch).
        rounds: Passes over the whole stream (long-term adaptation when > 1).
        out_dir: Output folder (default: ``<trainer.default_root_dir>/adapt``).
        save_adapted: Save each adapting method's final weights as a checkpoint in the source's own
            format (``ImageClassifier``, or CLIP/SigLIP for a zero-shot source).
        max_batches: Cap on batches per domain (smoke tests).
        plot: Write the PNG plot of error (or entropy, unlabelled) along the stream.
        write_predictions: Write ``predictions.jsonl``; default: when the stream is unlabelled.
    """
    import json
    import os

    import torch

    from mmalign.training.outputs import check_output_dir

    from .domains import DomainStream
    from .module import TTAModel
    from .pipeline import adapt as run_adaptation
    from .pipeline import method_summary
    from .report import error_table, signals_table, write_outputs
    from .results import StreamResult

    if not isinstance(model, TTAModel):
        raise TypeError(f"adapt needs model.class_path: mmalign.tta.TTAModel, got {type(model).__name__}.")
    if not isinstance(datamodule, DomainStream):
        raise TypeError("adapt needs data.class_path: mmalign.tta.CorruptionStream or mmalign.tta.TargetStream, got "
                        f"{type(datamodule).__name__}.")
    # every output (results, predictions, adapted weights) goes to out_dir: checked before any work
    out_dir = check_output_dir(out_dir or os.path.join(trainer.default_root_dir, "adapt"), "adapt results", "--out_dir")
    src = os.path.realpath(model.source_checkpoint) if model.source_checkpoint else None
    for name in model.hparams.methods if save_adapted else ():
        if src is not None and os.path.realpath(os.path.join(out_dir, f"adapted_{name}.ckpt")) == src:
            raise ValueError(f"save_adapted would overwrite the source checkpoint {src}; choose another out_dir.")
    device = trainer.strategy.root_device
    datamodule.prepare_data()
    datamodule.setup("test")
    sink, pred_path = None, os.path.join(out_dir, "predictions.jsonl")
    if write_predictions or (write_predictions is None and not datamodule.labelled):
        pred_file = open(pred_path, "w")

        def sink(p):
            labels = p["label"] or [None] * len(p["pred"])
            for key, c, conf, y in zip(p["keys"] or [None] * len(p["pred"]), p["pred"], p["confidence"], labels):
                pred_file.write(json.dumps({"method": p["method"], "round": p["round"] + 1, "domain": p["domain"],
                                            "key": key, "pred": c, "confidence": round(conf, 5),
                                            **({"label": y} if y is not None else {})}) + "\n")
    result, methods = StreamResult([], [], rounds, setting), {}

    def extra() -> dict:
        return {**method_summary(methods), "source_checkpoint": model.source_checkpoint,
                "norm_prior": model.cfg.norm.prior, "skipped_samples": datamodule.health.totals}

    try:
        run_adaptation(model, datamodule, setting, rounds, max_batches, out_dir, device, log=print,
                       on_predictions=sink, result=result, methods=methods)
    except BaseException:
        if result.records:  # the stream had started: keep what was measured, marked incomplete
            paths = write_outputs(result, out_dir, False, extra())
            print(f"[adapt] stopped early ({result.error}); what was measured is in " + ", ".join(paths.values())
                  + " (results.json: complete false)")
        raise
    finally:
        if sink is not None:
            pred_file.close()
    print(error_table(result))
    print(signals_table(result))
    tput = result.throughput()
    if "source" in tput:
        print("throughput (images/s): " + ", ".join(f"{m} {v:.0f} ({v / tput['source']:.2f}x source)"
                                                     for m, v in tput.items()))
    info = extra()
    if info["filter_kept_fraction"]:
        print("filter kept: " + ", ".join(f"{n} {100 * v:.1f}% of samples"
                                          for n, v in info["filter_kept_fraction"].items()))
    short = result.short_batches
    if short["merged"] or any(info["unadapted_small_batches"].values()):
        print(f"short batches: {short['merged']} merged into the batch before ({short['merged_samples']} samples); "
              "predicted without an update: " + ", ".join(f"{n} {v}" for n, v in info["unadapted_small_batches"].items()
                                                        if v))
    if result.resets:
        print(f"guard: {len(result.resets)} reset(s) on collapse (results.json guard_resets)")
    paths = write_outputs(result, out_dir, plot, info)
    if sink is not None:
        paths["predictions"] = pred_path
    if save_adapted:
        for name, m in methods.items():
            if m.trains:
                dst = os.path.join(out_dir, f"adapted_{name}.ckpt")
                tmp = dst + ".tmp"
                torch.save(model.adapted_checkpoint(m), tmp)
                os.replace(tmp, dst)
                paths[f"adapted_{name}"] = dst
    print("[adapt] wrote " + ", ".join(paths.values()))
    return {"result": result, "paths": paths}
