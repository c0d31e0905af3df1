"""``python -m mmalign adapt`` end to end on a real ImageClassifier checkpoint (tiny data)."""

import hashlib
import json
import math
import os

import pytest
import torch

from mmalign import cli
from mmalign.tta.specs import DEFAULT_PRIOR

from _tta import image_folder as _image_folder
from _tta import tiny_checkpoint as _tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_adapt_cli_outputs_and_source_untouched(in_tmp, monkeypatch):
    import builtins

    ckpt = str(in_tmp / "source.ckpt")
    _tiny_checkpoint(ckpt)
    digest = hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
    opened, real_open = [], builtins.open

    def counting_open(file, *args, **kwargs):
        if os.path.abspath(str(file)) == ckpt:
            opened.append(args[0] if args else kwargs.get("mode", "r"))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    cli.main(["adapt", "-c", os.path.join(ROOT, "configs/tta/digits_c.yaml"),
              f"--model.init_args.source.checkpoint={ckpt}", "--model.init_args.methods=[source,tent_filter,cafa,eata]",
              "--model.init_args.eata.fisher_samples=64", "--model.init_args.guard.source_fallback=false",
              "--data.init_args.benchmark.corruptions=[gaussian_noise,contrast]",
              "--data.init_args.benchmark.dir=digits-c-cli",
              "--data.init_args.adapt.source_max_samples=50", "--data.init_args.stream.num_workers=0",
              "--data.init_args.stream.batch_size=8", "--max_batches=2", "--setting=reset", "--save_adapted=true",
              "--out_dir=out", "--trainer.enable_progress_bar=false"])
    assert opened == ["rb"], f"the source checkpoint was opened {len(opened)} times: read it once, hash it once"
    monkeypatch.setattr(builtins, "open", real_open)
    assert hashlib.sha256(open(ckpt, "rb").read()).hexdigest() == digest
    assert os.path.isfile(in_tmp / "source.cafa_stats.pt")  # stored next to the checkpoint
    res = json.load(open(in_tmp / "out" / "results.json"))
    assert res["methods"] == ["source", "tent_filter", "cafa", "eata"] and res["setting"] == "reset"
    assert res["complete"] is True and res["norm_prior"] == DEFAULT_PRIOR  # the shipped config keeps the default
    errs = res["error_by_round_domain"][0]
    assert set(errs["cafa"]) == {"gaussian_noise/5", "contrast/5"}
    assert res["updates"]["cafa"] == 4 and res["updates"]["source"] == 0
    assert res["throughput_vs_source"]["source"] == 1.0
    kept = res["filter_kept_fraction"]
    # reset setting, 2 domains x 2 batches of 8: each domain's first batch meets an adapted model equal to
    # the original, so all 8 are kept; a fraction of the 32 samples, at least 16 of them
    assert set(kept) == {"tent_filter", "eata"} and (kept["tent_filter"] * 32) % 1 == 0 and kept["tent_filter"] >= 0.5
    assert os.path.getsize(in_tmp / "out" / "error_stream.png") > 1000
    rows = open(in_tmp / "out" / "errors.csv").read().splitlines()
    assert rows[0] == "method,round,domain,error_pct,entropy,agreement_pct,kept_pct,resets,n" and len(rows) == 1 + 4 * 2
    from mmalign.classify import ImageClassifier

    adapted = ImageClassifier.load_from_checkpoint(str(in_tmp / "out" / "adapted_cafa.ckpt"), map_location="cpu")
    source = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    assert not torch.equal(adapted.model.bn1.weight, source.model.bn1.weight)  # norm affine adapted
    assert torch.equal(adapted.model.conv1.weight, source.model.conv1.weight)  # everything else frozen
    assert torch.equal(adapted.model.bn1.running_mean, source.model.bn1.running_mean)


def _target_args(ckpt, spec, *extra):
    return ["adapt", "-c", os.path.join(ROOT, "configs/tta/digits_c.yaml"), "-c",
            os.path.join(ROOT, "configs/tta/target.yaml"), f"--model.init_args.source.checkpoint={ckpt}",
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
    assert set(ent) == {"source", "tent", "tent_filter"}
    assert res["updates"]["tent"] + res["source_fallback_batches"]["tent"] == 3  # 12 images, batch 4
    rows = [json.loads(x) for x in open(in_tmp / "out" / "predictions.jsonl")]
    # each sample's entropy (nats) lies between -ln(max p) and h(max p) + (1 - max p) ln 9 (10 classes):
    # the reported mean entropy must lie between the means of those bounds, read from the predictions
    for m, v in ent.items():
        conf = [r["confidence"] for r in rows if r["method"] == m]
        lo = sum(-math.log(c) for c in conf) / len(conf)
        hi = sum(-c * math.log(c) - (1 - c) * math.log(max(1 - c, 1e-12)) + (1 - c) * math.log(9) for c in conf) / len(conf)
        assert lo - 1e-3 <= v[0] <= hi + 1e-3, (m, lo, v[0], hi)
    assert len(rows) == 12 * 3 and {r["method"] for r in rows} == {"source", "tent", "tent_filter"}
    assert {r["key"] for r in rows} == {f"{c}_{i}" for c in ("circle", "square") for i in range(6)}
    assert all("label" not in r for r in rows)
    # the label-free signals agree with the predictions written: agreement with the source per sample
    pred = {(r["method"], r["key"]): r["pred"] for r in rows}
    agree = sum(pred[("tent", k)] == pred[("source", k)] for _, k in pred) / 3 / 12
    sig = res["signals_by_round_domain"][0]
    assert sig["tent"]["target"]["agreement_pct"] == pytest.approx(100 * agree)
    assert sig["source"]["target"]["agreement_pct"] == 100.0
    kept = sig["tent_filter"]["target"]["kept_pct"]
    if res["updates"]["tent_filter"]:  # the filter's counters and the per-batch records tell the same
        assert kept == pytest.approx(100 * res["filter_kept_fraction"]["tent_filter"])
    assert os.path.isfile(in_tmp / "out" / "adapted_tent.ckpt") and os.path.isfile(in_tmp / "out" / "entropy_stream.png")


def test_adapt_on_a_labelled_image_folder_reports_errors(in_tmp):
    ckpt = str(in_tmp / "source.ckpt")
    _tiny_checkpoint(ckpt)
    folder = _image_folder(in_tmp / "labelled", classes=("a", "b", "c"), per_class=4)
    cli.main(_target_args(ckpt, folder, "--out_dir=out2"))
    res = json.load(open(in_tmp / "out2" / "results.json"))
    err = res["error_by_round"]["source"][0]
    assert res["labelled"] is True and abs(err * 12 / 100 - round(err * 12 / 100)) < 1e-6  # % of 12 samples
    assert not os.path.exists(in_tmp / "out2" / "predictions.jsonl")  # labelled: errors, no predictions by default
    cli.main(_target_args(ckpt, folder, "--out_dir=out3", "--write_predictions=true"))
    res = json.load(open(in_tmp / "out3" / "results.json"))
    rows = [json.loads(x) for x in open(in_tmp / "out3" / "predictions.jsonl")]
    for method in ("source", "tent"):  # the error reported is the one of the predictions written
        mine = [r for r in rows if r["method"] == method]
        assert len(mine) == 12 and {r["label"] for r in mine} == {0, 1, 2}
        wrong = sum(r["pred"] != r["label"] for r in mine)
        assert res["error_by_round"][method][0] == pytest.approx(100 * wrong / 12)
