"""Teacher registry: every kind gives patch tokens on the asked grid, frozen, from local checkpoints."""

import pytest
import torch

from mmalign.encoders import GridMismatchError, build_teacher, teacher_kinds

VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32], "stem_width": 8}
CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
SPECS = {  # (kind, name, kwargs); kind classifier builds from a tiny ImageClassifier checkpoint (made per test)
    "classifier": ("classifier", None, {}),
    "timm_vit": ("timm", "vit_tiny_patch16_224", {"model_kwargs": VIT}),
    "timm_resnet": ("timm", "resnet18", {"model_kwargs": RESNET, "input_size": 32}),
    "open_clip": ("open_clip", "ViT-B-32", {"model_kwargs": CLIP}),
}


def test_registry_covers_kinds():
    assert set(teacher_kinds()) >= {"timm", "open_clip"}
    assert {s[0] for s in SPECS.values()} == set(teacher_kinds())
    with pytest.raises(ValueError, match="registered kinds"):
        build_teacher("nope", "x")


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("grid", [4, 8])
def test_tokens_on_requested_grid(spec, grid, tmp_path):
    kind, name, kw = SPECS[spec]
    ckpt = _classifier_ckpt(tmp_path / "clf.ckpt") if kind == "classifier" else None
    t = build_teacher(kind, name, ckpt, grid=grid, **kw)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    tok = t.encode(x)
    assert t.grid_size == grid and tok.shape == (3, grid * grid, t.embed_dim)
    assert t(x.add(1).div(2)).shape == (3, t.embed_dim)  # pooled FD features
    # frozen: no grads, eval even after .train()
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not any(m.training for m in t.modules())


def _classifier_ckpt(path, **kw):
    import lightning

    from mmalign.classify import ImageClassifier

    clf = ImageClassifier({"name": "resnet18", "kwargs": RESNET}, num_classes=5, transform={"image_size": 32, **kw})
    torch.save({"state_dict": clf.state_dict(), "hyper_parameters": dict(clf.hparams),
                "pytorch-lightning_version": lightning.__version__}, str(path))
    return str(path)


def test_classifier_kind_reads_the_architecture(tmp_path):
    import timm

    path = _classifier_ckpt(tmp_path / "clf.ckpt", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    t = build_teacher("classifier", None, path)
    ref = timm.create_model("resnet18", num_classes=0, **RESNET)
    assert t.embed_dim == ref.num_features and t.input_size == 32 and t.mean == (0.1, 0.2, 0.3)
    assert "5 classes" in t.describe() and path in t.describe()
    with pytest.raises(ValueError, match="needs a checkpoint_path"):
        build_teacher("classifier", None)


def test_vit_drops_prefix_and_uses_final_norm():
    t = build_teacher("timm", "vit_tiny_patch16_224", model_kwargs=VIT)
    x = torch.randn(2, 3, 32, 32)
    ref = t.model.forward_features(x)  # (B, 1 + 64, D), final norm applied by timm
    assert torch.allclose(t.forward_tokens(x), ref[:, 1:])
    tok = t.forward_tokens(x)  # LayerNorm without affine shift at init: per-token mean ~ 0
    assert tok.mean(-1).abs().max() < 1e-4


def test_cnn_feature_map_flattened_as_tokens():
    t = build_teacher("timm", "resnet18", model_kwargs=RESNET, input_size=64)
    fmap = t.model.forward_features(torch.randn(2, 3, 64, 64))
    assert t.forward_tokens(torch.randn(2, 3, 64, 64)).shape == (2, fmap.shape[2] * fmap.shape[3], fmap.shape[1])


def test_interpolated_tokens_option():
    t = build_teacher("timm", "vit_tiny_patch16_224", model_kwargs=VIT)
    assert t.encode(torch.rand(2, 3, 32, 32), grid=16).shape == (2, 256, 32) and t.grid_size == 8


def test_timm_local_checkpoint(tmp_path):
    import timm

    src = timm.create_model("vit_tiny_patch16_224", num_classes=5, **VIT)
    path = str(tmp_path / "vit.pt")
    torch.save(src.state_dict(), path)
    t = build_teacher("timm", "vit_tiny_patch16_224", path, model_kwargs=VIT)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(t.forward_tokens(x), src.forward_features(x)[:, 1:], atol=1e-5)
    assert path in t.describe()


def test_open_clip_checkpoint_file(tmp_path):
    import open_clip

    clip = open_clip.create_model("ViT-B-32", pretrained=None, **CLIP)
    path = str(tmp_path / "clip.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in clip.state_dict().items()}}, path)
    t = build_teacher("open_clip", "ViT-B-32", path, model_kwargs=CLIP)
    x = torch.randn(2, 3, 32, 32)
    clip.visual.output_tokens = True
    _, ref = clip.visual(x)
    assert torch.allclose(t.forward_tokens(x), ref, atol=1e-5)


def test_fixed_grid_teacher_errors():
    t = build_teacher("timm", "vit_tiny_patch16_224", model_kwargs=VIT)
    t.resizable = False
    with pytest.raises(GridMismatchError, match=r"teacher\.interpolate_tokens"):
        t.set_grid(16)


def test_mmalign_clip_checkpoint_teaches(tmp_path):
    """An mmalign CLIP checkpoint with an inline architecture works as a REPA teacher."""
    from mmalign.contrastive import CLIP

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    clip = CLIP(model={"name": "mmalign-teacher-tiny", "cfg": cfg})
    path = tmp_path / "clip.ckpt"
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams)}, path)
    t = build_teacher("open_clip", "mmalign-teacher-tiny", str(path))
    tokens = t.forward_tokens(torch.randn(2, 3, 16, 16))
    assert tokens.shape == (2, 16, 32)  # 4x4 grid, prefix token dropped, width 32
    visual = dict(clip.model.visual.named_parameters())
    assert all(torch.equal(p, visual[n]) for n, p in t.model.named_parameters() if n in visual)


def test_torchvision_weights_convert_to_timm_by_position():
    """The MobileNetV2 fetch path: torchvision's layout renamed onto timm's gives the same outputs."""
    import timm
    import torchvision

    from mmalign.models.weights import CheckpointMismatchError, convert_by_position

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2().eval()
    with torch.no_grad():
        for m in tv.modules():  # non-trivial BN statistics, so a misplaced buffer would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = timm.create_model("mobilenetv2_100", pretrained=False).eval()
    model.load_state_dict(convert_by_position(tv.state_dict(), model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x))
    with pytest.raises(CheckpointMismatchError, match="not the same architecture"):
        convert_by_position(tv.state_dict(), timm.create_model("resnet18", pretrained=False))


def test_clip_timm_image_tower_teaches(tmp_path):
    """The quick start's kind of CLIP (a timm image tower) teaches through kind open_clip with only its checkpoint:
    the trunk's final feature map is the token grid, with the CLIP's own weights; trunk_kwargs dilate it."""
    from mmalign.contrastive import CLIP

    cfg = {"embed_dim": 16, "custom_text": True,
           "vision_cfg": {"timm_model_name": "mobilenetv2_035", "timm_model_pretrained": False, "timm_pool": "avg",
                          "timm_proj": "linear", "image_size": 64},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    clip = CLIP(model={"name": "mmalign-timm-tower-tiny", "cfg": cfg})
    with torch.no_grad():  # non-trivial BN statistics, so a buffer left at its default would show
        for m in clip.model.visual.trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "clip.ckpt"
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams)}, path)
    plain = build_teacher("open_clip", None, str(path))
    x = torch.randn(2, 3, 64, 64)
    trunk = clip.model.visual.trunk.eval()
    with torch.no_grad():
        ref = trunk.forward_features(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(plain.forward_tokens(x), ref)
    assert plain.grid_size == 2 and plain.input_size == 64  # stride 32 at the CLIP's 64 px
    dilated = build_teacher("open_clip", None, str(path), grid=8, trunk_kwargs={"output_stride": 8})
    assert dilated.grid_size == 8 and dilated.input_size == 64 and "mmalign-timm-tower-tiny" in dilated.describe()
    with pytest.raises(ValueError, match="not 'ViT-B-32'"):
        build_teacher("open_clip", "ViT-B-32", str(path))
