"""``python -m mmalign zeroshot -c CONFIG``: zero-shot classification of an open_clip model."""

from __future__ import annotations

import json
import os

from mmalign.cli import register_subcommand


@register_subcommand("zeroshot")
def zeroshot(trainer, model, datamodule, classes: str, label_field: str = "cls", out: str = "runs/zeroshot",
             ckpt_path: str | None = None) -> dict:
    """Zero-shot classification of an open_clip model on a labelled webdataset: prints a table, writes JSON.

    Args:
        classes: Class-spec file: ``{"classnames": [...], "templates": ["a photo of a {}.", ...]}``;
            the class index of a sample is its label.
        label_field: Where the label is: ``cls`` (an image-label datamodule's ``.cls``) or a json field.
        out: Folder for ``zeroshot.json``.
        ckpt_path: An mmalign checkpoint to evaluate (else the model as configured, e.g. with
            ``model.init_args.pretrained`` pointing at open_clip weights).
    """
    from mmalign.contrastive import ContrastiveModule

    if not isinstance(model, ContrastiveModule):
        raise TypeError(f"zeroshot needs an mmalign.contrastive model (CLIP/SigLIP), got {type(model).__name__}.")
    model.set_zeroshot_classes(classes, label_field)
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    results = getattr(model, "eval_results", {}).get("test", {})
    if "test/zeroshot_top1" not in results:
        raise RuntimeError(f"no zero-shot result: no test sample carried label field '{label_field}'. Set "
                           "label_field to the json field (or 'cls' with an image-label datamodule).")
    spec = model._zeroshot_spec
    per_class = results.get("test/zeroshot_per_class_top1")
    report = {"classes": classes, "num_classes": len(spec.classnames), "templates": len(spec.templates),
              "top1": results["test/zeroshot_top1"], "top5": results.get("test/zeroshot_top5"),
              "mean_per_class_top1": results.get("test/zeroshot_mean_per_class_top1"),
              "per_class_top1": dict(zip(spec.classnames, per_class)) if per_class else None,
              "model": model.hparams.model_name, "pretrained": model.hparams.pretrained, "ckpt_path": ckpt_path}
    if trainer.is_global_zero:
        print(f"\nzero-shot on {report['num_classes']} classes x {report['templates']} templates")
        print(f"  {'top-1':<22} {100 * report['top1']:6.2f} %")
        if report["top5"] is not None:
            print(f"  {'top-5':<22} {100 * report['top5']:6.2f} %")
        if report["mean_per_class_top1"] is not None:
            print(f"  {'mean per-class top-1':<22} {100 * report['mean_per_class_top1']:6.2f} %")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "zeroshot.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"  wrote {path}")
    return report
