"""TTAModel's grouped specs: validation by name, old flat options, source by kind, export per family."""

import math
import re

import pytest
import torch

from mmalign.specs import migrate_flat, moved_option_hint
from mmalign.tta.module import TTAModel
from mmalign.tta.specs import AdaptSpec, CafaSpec, EataSpec, NormSpec, SarSpec, SourceSpec

from _tta import tiny_checkpoint


@pytest.mark.parametrize("build,message", [
    (lambda: AdaptSpec(lr=0), "adapt.lr must be > 0, got 0"),
    (lambda: AdaptSpec(optimizer="rmsprop"), "adapt.optimizer must be one of ['adam', 'sgd'], got 'rmsprop'"),
    (lambda: AdaptSpec(min_batch=1), "adapt.min_batch must be >= 2"),
    (lambda: AdaptSpec(small_batch="drop"), "adapt.small_batch must be one of ['merge', 'predict', 'error']"),
    (lambda: AdaptSpec(norms="instancenorm"), "adapt.norms must be one of"),
    (lambda: NormSpec(prior=float("nan")), "norm.prior must be >= 0"),
    (lambda: CafaSpec(shrinkage=1.5), "cafa.shrinkage must be in [0, 1], got 1.5"),
    (lambda: EataSpec(fisher_samples=0), "eata.fisher_samples must be > 0, got 0"),
    (lambda: SarSpec(rho=-0.05), "sar.rho must be > 0, got -0.05"),
    (lambda: SourceSpec(kind="onnx"), "source.kind must be one of ['classifier', 'open_clip', 'timm'], got 'onnx'"),
    (lambda: SourceSpec(num_classes=0), "source.num_classes must be > 0"),
])
def test_bad_values_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_at_most_ten_arguments_and_every_old_option_has_a_new_place():
    import inspect

    params = [p for p in inspect.signature(TTAModel.__init__).parameters if p != "self"]
    assert len(params) <= 10, params
    old = ["source_checkpoint", "model_name", "num_classes", "model_kwargs", "image_size", "mean", "std", "methods",
           "lr", "adapt_norms", "filter_alpha", "filter_diversity", "small_batch", "cafa_stats", "cafa_covariance",
           "cafa_shrinkage", "cafa_denominator", "zeroshot_classes"]
    for name in old:
        assert name in params or moved_option_hint(TTAModel, name), name
    assert "moved to 'cafa.shrinkage'" in moved_option_hint(TTAModel, "cafa_shrinkage")


def test_old_flat_hparams_migrate_and_build(tmp_path):
    ckpt = str(tmp_path / "s.ckpt")
    tiny_checkpoint(ckpt)
    old = {"source_checkpoint": ckpt, "methods": ["source", "tent"], "lr": 0.01, "adapt_norms": "batchnorm",
           "small_batch": "source_stats", "filter_alpha": 0.25, "cafa_shrinkage": 0.3}
    new = migrate_flat(TTAModel, old)
    assert new["source"] == {"checkpoint": ckpt} and new["adapt"] == {"lr": 0.01, "norms": "batchnorm",
                                                                       "small_batch": "source_stats"}
    model = TTAModel(**new)
    assert model.cfg.adapt.lr == 0.01 and model.cfg.adapt.small_batch == "predict"  # the old spelling, translated
    assert model.cfg.filter.alpha == 0.25 and model.cfg.cafa.shrinkage == 0.3
    assert model.hparams["adapt"]["lr"] == 0.01 and isinstance(model.hparams["norm"], dict)  # plain containers


def test_source_kind_detected_once_with_a_notice_and_explicit_kind_checked(tmp_path, capsys):
    ckpt = str(tmp_path / "s.ckpt")
    tiny_checkpoint(ckpt)
    model = TTAModel(source={"checkpoint": ckpt}, methods=["source"])
    assert model.source_hparams["kind"] == "classifier" and model.num_classes == 10
    assert "source.kind not set" in capsys.readouterr().out
    TTAModel(source={"checkpoint": ckpt, "kind": "classifier"}, methods=["source"])
    assert "source.kind" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="source.name=.resnet50. disagrees"):
        TTAModel(source={"checkpoint": ckpt, "kind": "classifier", "name": "resnet50"}, methods=["source"])
    # the same weights as plain timm weights: kind timm, name and classes given
    raw = torch.load(ckpt, weights_only=True)
    plain = tmp_path / "plain.pth"
    torch.save({k.removeprefix("model."): v for k, v in raw["state_dict"].items()}, plain)
    timm_model = TTAModel(source={"checkpoint": str(plain), "kind": "timm", "name": "resnet18", "num_classes": 10,
                                  "kwargs": raw["hyper_parameters"]["network"]["kwargs"]}, methods=["source"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm_model(x), model(x))
    with pytest.raises(ValueError, match="source.kind timm needs source.name"):
        TTAModel(source={"checkpoint": str(plain)}, methods=["source"])


def test_adapted_checkpoint_is_written_by_the_classifier_family(tmp_path):
    from mmalign.classify import ImageClassifier

    ckpt = str(tmp_path / "s.ckpt")
    tiny_checkpoint(ckpt)
    model = TTAModel(source={"checkpoint": ckpt, "kind": "classifier"}, methods=["tent"], norm={"prior": 8.0})
    tent = model.build_methods()["tent"]
    tent(torch.randn(4, 3, 32, 32))
    out = tmp_path / "adapted.ckpt"
    torch.save(model.adapted_checkpoint(tent), out)
    loaded = ImageClassifier.load_from_checkpoint(str(out), map_location="cpu")
    assert torch.equal(loaded.model.bn1.weight, tent.model.net.bn1.weight.detach())
    assert torch.load(out, weights_only=True)["tta"]["norm_prior"] == 8.0
    assert math.isclose(loaded.model.bn1.eps, 1e-5)


def test_null_on_the_command_line_is_null_in_a_nested_spec():
    """jsonargparse hands ``--model.init_args.source.checkpoint=null`` to the spec as the string 'None'."""
    assert SourceSpec(checkpoint="None", kind="null").checkpoint is None
    assert SourceSpec(kind="None").kind is None and CafaSpec(stats="null").stats is None
