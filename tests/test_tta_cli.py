"""``python -m mmalign adapt`` end to end on a real ImageClassifier checkpoint (tiny data)."""

import hashlib
import json
import os

import lightning
import torch

from mmalign import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_checkpoint(path):
    from mmalign.classify import ImageClassifier

    m = ImageClassifier({"name": "resnet18", "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8}},
                        num_classes=10, transform={"image_size": 32})
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)


def test_adapt_cli_outputs_and_source_untouched(in_tmp):
    ckpt = str(in_tmp / "source.ckpt")
    _tiny_checkpoint(ckpt)
    digest = hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
    cli.main(["adapt", "-c", os.path.join(ROOT, "configs/tta/digits_c.yaml"),
              f"--model.init_args.source_checkpoint={ckpt}", "--model.init_args.methods=[source,tent_filter,cafa]",
              "--data.init_args.benchmark.corruptions=[gaussian_noise,contrast]",
              "--data.init_args.benchmark.dir=digits-c-cli",
              "--data.init_args.adapt.source_max_samples=50", "--data.init_args.stream.num_workers=0",
              "--data.init_args.stream.batch_size=8", "--max_batches=2", "--setting=reset", "--save_adapted=true",
              "--out_dir=out", "--trainer.enable_progress_bar=false"])
    assert hashlib.sha256(open(ckpt, "rb").read()).hexdigest() == digest
    assert os.path.isfile(in_tmp / "source.cafa_stats.pt")  # stored next to the checkpoint
    res = json.load(open(in_tmp / "out" / "results.json"))
    assert res["methods"] == ["source", "tent_filter", "cafa"] and res["setting"] == "reset"
    errs = res["error_by_round_domain"][0]
    assert set(errs["cafa"]) == {"gaussian_noise/5", "contrast/5"}
    assert res["updates"]["cafa"] == 4 and res["updates"]["source"] == 0
    assert res["throughput_vs_source"]["source"] == 1.0
    kept = res["filter_kept_fraction"]
    assert set(kept) == {"tent_filter"} and 0.0 <= kept["tent_filter"] <= 1.0
    assert os.path.getsize(in_tmp / "out" / "error_stream.png") > 1000
    rows = open(in_tmp / "out" / "errors.csv").read().splitlines()
    assert rows[0] == "method,round,domain,error_pct,entropy,n" and len(rows) == 1 + 3 * 2
    from mmalign.classify import ImageClassifier

    adapted = ImageClassifier.load_from_checkpoint(str(in_tmp / "out" / "adapted_cafa.ckpt"), map_location="cpu")
    source = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    assert not torch.equal(adapted.model.bn1.weight, source.model.bn1.weight)  # norm affine adapted
    assert torch.equal(adapted.model.conv1.weight, source.model.conv1.weight)  # everything else frozen
    assert torch.equal(adapted.model.bn1.running_mean, source.model.bn1.running_mean)


def _image_folder(root, classes=("circle", "square"), per_class=6, labelled=True):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        folder = os.path.join(root, c) if labelled else root
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = (rng.random((32, 32, 3)) * 255).astype("uint8")
            Image.fromarray(img).save(os.path.join(folder, f"{c}_{i}.png"))
    return str(root)


def _target_args(ckpt, spec, *extra):
    return ["adapt", "-c", os.path.join(ROOT, "configs/tta/digits_c.yaml"), "-c",
            os.path.join(ROOT, "configs/tta/target.yaml"), f"--model.init_args.source_checkpoint={ckpt}",
            "--model.init_args.methods=[source,tent,tent_filter]", f"--data.init_args.shards.test={spec}",
            "--data.init_args.stream.num_workers=0", "--data.init_args.stream.batch_size=4",
            "--trainer.enable_progress_bar=false",
            *extra]


def test_adapt_on_an_unlabelled_image_folder(in_tmp):
    """Your own data, no labels: predictions are written per sample and method, entropy is reported
    instead of error, the filter's kept fraction is tracked, and the adapted weights are saved."""
    ckpt = str(in_tmp / "source.ckpt")
    _tiny_checkpoint(ckpt)
    folder = _image_folder(in_tmp / "photos", labelled=False)
    cli.main(_target_args(ckpt, folder, "--out_dir=out", "--save_adapted=true"))
    res = json.load(open(in_tmp / "out" / "results.json"))
    assert res["labelled"] is False and res["error_by_round"] is None and res["domains"] == ["target"]
    ent = res["entropy_by_round"]
    assert set(ent) == {"source", "tent", "tent_filter"} and all(0 < v[0] <= 2.31 for v in ent.values())  # <= ln 10
    assert 0.0 <= res["filter_kept_fraction"]["tent_filter"] <= 1.0 and res["updates"]["tent"] == 3
    rows = [json.loads(x) for x in open(in_tmp / "out" / "predictions.jsonl")]
    assert len(rows) == 12 * 3 and {r["method"] for r in rows} == {"source", "tent", "tent_filter"}
    assert {r["key"] for r in rows} == {f"{c}_{i}" for c in ("circle", "square") for i in range(6)}
    assert all(0 <= r["pred"] < 10 and 0 < r["confidence"] <= 1 and "label" not in r for r in rows)
    assert os.path.isfile(in_tmp / "out" / "adapted_tent.ckpt") and os.path.isfile(in_tmp / "out" / "entropy_stream.png")


def test_adapt_on_a_labelled_image_folder_reports_errors(in_tmp):
    ckpt = str(in_tmp / "source.ckpt")
    _tiny_checkpoint(ckpt)
    folder = _image_folder(in_tmp / "labelled", classes=("a", "b", "c"), per_class=4)
    cli.main(_target_args(ckpt, folder, "--out_dir=out2"))
    res = json.load(open(in_tmp / "out2" / "results.json"))
    assert res["labelled"] is True and 0.0 <= res["error_by_round"]["source"][0] <= 100.0
    assert not os.path.exists(in_tmp / "out2" / "predictions.jsonl")  # labelled: errors, no predictions by default
