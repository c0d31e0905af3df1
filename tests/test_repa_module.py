"""FlowMatchingDiffusion: gradients, teacher isolation, bad inputs, predict, VAE and precomputed features."""

import glob
import os

import pytest
import torch

from mmalign.encoders import GridMismatchError
from mmalign.repa import FlowMatchingDiffusion
from mmalign.repa.backbones import HookPointError

VIT = {"model_kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}
DIT = {"num_layers": 4, "patch_size": 4, "num_attention_heads": 2, "attention_head_dim": 16}
UNET = {"block_out_channels": [16, 32, 32], "norm_num_groups": 8}


def make(**kw):
    base = dict(num_classes=6, image_size=32, projector_dim=32, teacher_name="vit_tiny_patch16_224",
                teacher_kwargs=VIT, backbone="dit", backbone_kwargs=DIT, align="repa")
    base.update(kw)
    m = FlowMatchingDiffusion(**base)
    m.log = lambda *a, **k: None  # no trainer attached
    return m


def batch(n=4, label_max=6):
    return {"image": torch.rand(n, 3, 32, 32) * 2 - 1, "label": torch.arange(n) % label_max,
            "key": [f"k{i}" for i in range(n)]}


def test_teacher_isolated_from_training():
    m = make()
    teacher = m._teacher
    assert teacher is not None and not teacher.training
    params = {id(p) for p in m.trainable_parameters()}
    assert not params & {id(p) for p in teacher.parameters()}
    assert not params & {id(p) for p in m.ema.parameters()}
    assert {id(p) for p in m.parameters()}.isdisjoint({id(p) for p in teacher.parameters()})
    assert not any(k.startswith("_teacher") or "teacher" in k for k in m.state_dict())
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    m.train()
    assert not teacher.training


def _align_only_grads(m):
    m.hparams.label_dropout = 0.0
    b = batch()
    target = m._teacher.encode(b["image"])
    m._capture.active = True
    m.backbone(b["image"], torch.full((4,), 0.5), b["label"])
    m._capture.active = False
    from mmalign.repa.alignment import repa_cosine_loss

    repa_cosine_loss(m.head(m._capture.pop()), target).backward()
    return {n: (p.grad is not None and p.grad.abs().sum() > 0) for n, p in m.backbone.named_parameters()}


def test_alignment_gradient_reaches_only_blocks_up_to_hook_dit():
    m = make(hook_point="transformer_blocks.1")
    got = _align_only_grads(m)
    for n, has in got.items():
        late = n.startswith(("net.transformer_blocks.2", "net.transformer_blocks.3", "net.proj_out", "net.norm_out"))
        if late:
            assert not has, n
    assert got["net.pos_embed.proj.weight"] and got["net.transformer_blocks.1.ff.net.2.weight"]
    assert all(p.grad is not None for p in m.head.parameters())


def test_alignment_gradient_reaches_only_blocks_up_to_hook_unet():
    m = make(backbone="unet", backbone_kwargs=UNET, align="urepa", hook_point="mid_block")
    assert m.hook_grid == 8 and m.align_grid == 16  # 32 -> 16 -> 8, upsampled x2
    got = _align_only_grads(m)
    assert not any(has for n, has in got.items() if n.startswith(("net.up_blocks", "net.conv_norm_out", "net.conv_out")))
    assert got["net.conv_in.weight"] and any(has for n, has in got.items() if n.startswith("net.mid_block"))


def test_loss_terms_and_align_until_step(monkeypatch):
    m = make(backbone="unet", backbone_kwargs=UNET, align="urepa", align_until_step=3)
    logged = {}
    m.log = lambda name, value, **k: logged.__setitem__(name, float(value))
    m.training_step(batch(), 0)
    assert {"train/loss_velocity", "train/loss_cos", "train/loss_manifold", "train/loss"} <= set(logged)
    lam, w = m.hparams.align_lambda, m.hparams.manifold_weight
    expect = logged["train/loss_velocity"] + lam * (logged["train/loss_cos"] + w * logged["train/loss_manifold"])
    assert logged["train/loss"] == pytest.approx(expect, rel=1e-5)
    logged.clear()
    monkeypatch.setattr(FlowMatchingDiffusion, "global_step", property(lambda self: 3))
    m.training_step(batch(), 0)
    assert "train/loss_cos" not in logged and logged["train/loss"] == logged["train/loss_velocity"]


def test_bad_hook_point_lists_valid_ones():
    with pytest.raises(HookPointError, match=r"transformer_blocks\.3"):
        make(hook_point="transformer_blocks.9")
    with pytest.raises(HookPointError, match="mid_block"):
        make(backbone="unet", backbone_kwargs=UNET, align="urepa", hook_point="middle")


def test_teacher_grid_that_cannot_match():
    # an MLP-Mixer mixes a fixed token count: its 4x4 grid cannot become the DiT's 8x8
    with pytest.raises(GridMismatchError, match="teacher_interpolate_tokens"):
        make(teacher_name="mixer_s32_224", teacher_kwargs={"model_kwargs": {"img_size": 128}})
    m = make(teacher_name="mixer_s32_224", teacher_kwargs={"model_kwargs": {"img_size": 128}},
             teacher_interpolate_tokens=True)
    assert torch.isfinite(m.training_step(batch(), 0))


def test_label_outside_num_classes():
    m = make(align="none")
    with pytest.raises(ValueError, match=r"label 6 is outside \[0, 6\)"):
        m.training_step(batch(label_max=7, n=7), 0)


def test_predict_writes_png_grids(tmp_path):
    import lightning.pytorch as pl

    m = FlowMatchingDiffusion(num_classes=6, backbone="dit", backbone_kwargs=DIT, predict_num_samples=6,
                              predict_dir=str(tmp_path / "samples"), sample_steps=2, cfg_scale=2.0,
                              guidance_interval=(0.2, 0.9))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(m)
    files = glob.glob(str(tmp_path / "samples" / "*.png"))
    assert len(files) == 1 and out[0]["path"] in files
    from PIL import Image

    assert Image.open(files[0]).size[0] >= 6 * 32


def test_vae_latent_path(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(str(tmp_path / "vae"))
    m = make(vae_path=str(tmp_path / "vae"), backbone_kwargs={**DIT, "patch_size": 2})
    assert m.backbone.in_channels == 4 and m.backbone.image_size == 16 and m.align_grid == 8
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert m.generate(torch.arange(2), 2, "heun", 1.0).shape == (2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="AutoencoderKL"):
        make(vae_path=str(tmp_path / "missing"))


def test_precomputed_teacher_features(tmp_path):
    from mmalign.repa.features import write_features

    m = make()
    b = batch()
    meta = write_features([b, b], m._teacher, str(tmp_path / "feats"), grid=m.align_grid)
    assert meta["num_samples"] == 4 and os.path.isfile(tmp_path / "feats" / "meta.json")
    m2 = make(teacher_features=str(tmp_path / "feats"), teacher_name=None)
    assert m2._teacher is None
    flipped = torch.tensor([False, True, False, True])
    got = m2._targets(b, None, flipped)
    imgs = torch.where(flipped[:, None, None, None], b["image"].flip(-1), b["image"])
    assert torch.allclose(got, m._teacher.encode(imgs), atol=2e-2)  # stored as float16
    assert torch.isfinite(m2.training_step(b, 0))
    with pytest.raises(KeyError, match="no precomputed"):
        m2._targets({"key": ["zzz"]}, None, torch.tensor([False]))
