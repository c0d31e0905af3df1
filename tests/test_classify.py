import pytest
import torch

from mmalign.classify import ImageClassifier
from mmalign.models.weights import CheckpointMismatchError
from mmalign.models.timm_models import UnknownModelError, create_timm_model

TINY = {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 16], "stem_width": 8}


def test_unknown_timm_name_lists_close_matches():
    with pytest.raises(UnknownModelError, match="resnet18"):
        ImageClassifier({"name": "resnet_18"})


def test_local_checkpoint_loads_and_head_resets(tmp_path):
    src = create_timm_model("resnet18", 10, **TINY)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    same = create_timm_model("resnet18", 10, checkpoint_path=str(path), **TINY)
    x = torch.randn(2, 3, 32, 32)
    src.eval(), same.eval()
    assert torch.allclose(src(x), same(x))
    other = create_timm_model("resnet18", 4, checkpoint_path=str(path), **TINY)
    assert torch.equal(other.conv1.weight, src.conv1.weight) and other.fc.out_features == 4
    # a Lightning checkpoint of the classifier loads too (prefix "model." stripped)
    clf = ImageClassifier({"name": "resnet18", "kwargs": TINY}, num_classes=10)
    torch.save({"state_dict": clf.state_dict()}, tmp_path / "l.ckpt")
    again = create_timm_model("resnet18", 10, checkpoint_path=str(tmp_path / "l.ckpt"), **TINY)
    assert torch.equal(again.conv1.weight, clf.model.conv1.weight)


def test_mismatched_checkpoint_names_keys(tmp_path):
    torch.save(create_timm_model("resnet18", 10, **TINY).state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointMismatchError, match=r"17 shape mismatch.*layer1.0.bn1.bias: checkpoint \(8,\) vs model \(16,\)"):
        create_timm_model("resnet18", 10, checkpoint_path=str(tmp_path / "w.pth"), layers=[1, 1, 1, 1],
                          channels=[16, 16, 16, 16], stem_width=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_timm_model("resnet18", 10, checkpoint_path=str(tmp_path / "nope.pth"), **TINY)


def test_label_outside_classes_is_explained():
    clf = ImageClassifier({"name": "resnet18", "kwargs": TINY}, num_classes=3)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        clf.training_step({"image": torch.randn(2, 3, 16, 16), "label": torch.tensor([0, 5])}, 0)
