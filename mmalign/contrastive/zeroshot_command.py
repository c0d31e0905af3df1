"""``python -m mmalign zeroshot -c CONFIG``: zero-shot classification of an open_clip model."""

from __future__ import annotations

import os

def zeroshot(trainer, model, datamodule, classes: str | None = None, label_field: str = "cls", out: str | None = None,
             ckpt_path: str | None = None) -> dict:
    """Zero-shot classification of an open_clip model on a labelled webdataset: prints a table, writes JSON.

    Args:
        classes: Class-spec file: ``{"classnames": [...], "templates": ["a photo of a {}.", ...]}``;
            the class index of a sample is its label. Default, when ``test_shards`` is an image
            folder (``root/<class>/...``): its sub-folder names (``_`` read as a space) with the
            generic templates of ``mmalign/data/prompts/default.json``.
        label_field: Where the label is: ``cls`` (an image-label datamodule's ``.cls``) or a json field.
        out: Folder for ``zeroshot.json`` (default: ``<trainer.default_root_dir>/zeroshot``).
        ckpt_path: An mmalign checkpoint to evaluate (else the model as configured, e.g. with
            ``model.init_args.model.pretrained`` pointing at open_clip weights).
    """
    from mmalign.contrastive import ContrastiveModule
    from mmalign.jsonout import dump
    from mmalign.training.outputs import check_output_dir

    if not isinstance(model, ContrastiveModule):
        raise TypeError(f"zeroshot needs an mmalign.contrastive model (CLIP/SigLIP), got {type(model).__name__}.")
    out = out or os.path.join(trainer.default_root_dir, "zeroshot")
    check_output_dir(out, "zero-shot results", "--out", create=False)  # the CLI checked it too; API callers
    if classes is None:
        classes = _folder_classes(datamodule)
    model.set_zeroshot_classes(classes, label_field)
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    results = getattr(model, "eval_results", {}).get("test", {})
    if "test/zeroshot_top1" not in results:
        seen = getattr(model, "_fields_seen", None)
        raise ValueError(f"no zero-shot result: no test sample carries label field '{label_field}' (json fields "
                         f"seen: {seen}). Set --label_field to the json field holding the class index, or 'cls' "
                         "with an image-label datamodule.")
    spec = model._zeroshot_spec
    per_class = results.get("test/zeroshot_per_class_top1")
    report = {"classes": classes if isinstance(classes, str) else "image folder names", "num_classes": len(spec.classnames), "templates": len(spec.templates),
              "top1": results["test/zeroshot_top1"], "top5": results.get("test/zeroshot_top5"),
              "mean_per_class_top1": results.get("test/zeroshot_mean_per_class_top1"),
              "per_class_top1": dict(zip(spec.classnames, per_class)) if per_class else None,
              "model": model.cfg.model.name, "pretrained": model.cfg.model.pretrained, "ckpt_path": ckpt_path}
    if trainer.is_global_zero:
        print(f"\nzero-shot on {report['num_classes']} classes x {report['templates']} templates")
        print(f"  {'top-1':<22} {100 * report['top1']:6.2f} %")
        if report["top5"] is not None:
            print(f"  {'top-5':<22} {100 * report['top5']:6.2f} %")
        if report["mean_per_class_top1"] is not None:
            print(f"  {'mean per-class top-1':<22} {100 * report['mean_per_class_top1']:6.2f} %")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "zeroshot.json")
        dump(report, path)  # strict JSON: a class never seen has no accuracy (null, not NaN)
        print(f"  wrote {path}")
    return report


#: result options the CLI checks before any work (``{option: what goes there}``); and the scores mean
#: nothing for random weights, so the CLI refuses a run with neither --ckpt_path nor pretrained weights
zeroshot.outputs = {"out": "zero-shot results"}
zeroshot.needs_weights = True


def _folder_classes(datamodule):
    from datamodules.folders import FOLDER_SCHEME, class_names
    from datamodules.shards import expand_shards
    from mmalign.evaluation.prompts import ClassSpec, default_templates

    spec = getattr(datamodule, "shards", {}).get("test")
    urls = expand_shards(spec, "test_shards") if spec is not None else []
    names = class_names(urls[0]) if urls and urls[0].startswith(FOLDER_SCHEME) else []
    if not names:
        raise ValueError("zeroshot: give --classes (a class-spec file); only an image folder with one sub-folder "
                         "per class (test_shards: root/<class>/...) supplies class names by itself.")
    return ClassSpec(tuple(n.replace("_", " ") for n in names), default_templates())
