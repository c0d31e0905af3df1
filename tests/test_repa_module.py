"""FlowMatchingDiffusion: gradients, teacher isolation, bad inputs, predict, VAE and precomputed features,
frozen networks outside the checkpoint, specs, the EMA, compilation."""

import glob
import os

import pytest
import torch

from mmalign.encoders import GridMismatchError
from mmalign.repa import AlignSpec, DiffusionSpec, FDSpec, FlowMatchingDiffusion, OptimSpec, SamplingSpec
from mmalign.repa.backbones import HookPointError
from mmalign.repa.losses import repa_cosine_loss

VIT = {"model_kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}
DIT = {"num_layers": 4, "patch_size": 4, "num_attention_heads": 2, "attention_head_dim": 16}
UNET = {"block_out_channels": [16, 32, 32], "norm_num_groups": 8}


def make(diffusion=None, align=None, teacher=None, **kw):
    """A tiny model; ``diffusion`` / ``align`` / ``teacher`` update the defaults below (``teacher=False``: none)."""
    d = {"num_classes": 6, "image_size": 32, "backbone": "dit", "backbone_kwargs": DIT, **(diffusion or {})}
    a = {"mode": "repa", "projector_dim": 32, **(align or {})}
    t = None if teacher is False else {"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": VIT, **(teacher or {})}
    m = FlowMatchingDiffusion(diffusion=d, align=a, teacher=t, **kw)
    m.log = lambda *a, **k: None  # no trainer attached
    return m


def batch(n=4, label_max=6):
    return {"image": torch.rand(n, 3, 32, 32) * 2 - 1, "label": torch.arange(n) % label_max,
            "key": [f"k{i}" for i in range(n)]}


def test_teacher_isolated_from_training():
    m = make()
    teacher = m.teacher
    assert teacher is not None and not teacher.training
    params = {id(p) for p in m.trainable_parameters()}
    assert not params & {id(p) for p in teacher.parameters()}
    assert not params & {id(p) for p in m.ema.parameters()}
    optimized = {id(p) for g in m.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert optimized == params and optimized.isdisjoint({id(p) for p in teacher.parameters()})
    assert not any(k.startswith("_teacher") or "teacher" in k for k in m.state_dict())
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    m.train()
    assert not teacher.training


def _align_only_grads(m):
    b = batch()
    target = m.teacher.encode(b["image"])
    m._capture.active = True
    m.backbone(b["image"], torch.full((4,), 0.5), b["label"])
    m._capture.active = False
    repa_cosine_loss(m.head(m._capture.pop()), target).backward()
    return {n: (p.grad is not None and p.grad.abs().sum() > 0) for n, p in m.backbone.named_parameters()}


def test_alignment_gradient_reaches_only_blocks_up_to_hook_dit():
    m = make(diffusion={"label_dropout": 0.0}, align={"hook_point": "transformer_blocks.1"})
    got = _align_only_grads(m)
    for n, has in got.items():
        late = n.startswith(("net.transformer_blocks.2", "net.transformer_blocks.3", "net.proj_out", "net.norm_out"))
        if late:
            assert not has, n
    assert got["net.pos_embed.proj.weight"] and got["net.transformer_blocks.1.ff.net.2.weight"]
    assert all(p.grad is not None for p in m.head.parameters())


def test_alignment_gradient_reaches_only_blocks_up_to_hook_unet():
    m = make(diffusion={"backbone": "unet", "backbone_kwargs": UNET, "label_dropout": 0.0},
             align={"mode": "urepa", "hook_point": "mid_block"})
    assert m.hook_grid == 8 and m.align_grid == 16  # 32 -> 16 -> 8, upsampled x2
    got = _align_only_grads(m)
    assert not any(has for n, has in got.items() if n.startswith(("net.up_blocks", "net.conv_norm_out", "net.conv_out")))
    assert got["net.conv_in.weight"] and any(has for n, has in got.items() if n.startswith("net.mid_block"))


def test_loss_terms_and_align_until_step(monkeypatch):
    m = make(diffusion={"backbone": "unet", "backbone_kwargs": UNET}, align={"mode": "urepa", "until_step": 3})
    logged = {}
    m.log = lambda name, value, **k: logged.__setitem__(name, float(value))
    m.training_step(batch(), 0)
    assert {"train/loss_velocity", "train/loss_cos", "train/loss_manifold", "train/loss"} <= set(logged)
    lam, w = m.cfg.align.weight, m.cfg.align.manifold_weight
    expect = logged["train/loss_velocity"] + lam * (logged["train/loss_cos"] + w * logged["train/loss_manifold"])
    assert logged["train/loss"] == pytest.approx(expect, rel=1e-5)
    logged.clear()
    monkeypatch.setattr(FlowMatchingDiffusion, "global_step", property(lambda self: 3))
    m.training_step(batch(), 0)
    assert "train/loss_cos" not in logged and logged["train/loss"] == logged["train/loss_velocity"]


def test_bad_hook_point_lists_valid_ones():
    with pytest.raises(HookPointError, match=r"transformer_blocks\.3"):
        make(align={"hook_point": "transformer_blocks.9"})
    with pytest.raises(HookPointError, match="mid_block"):
        make(diffusion={"backbone": "unet", "backbone_kwargs": UNET}, align={"mode": "urepa", "hook_point": "middle"})


def test_teacher_grid_that_cannot_match():
    # an MLP-Mixer mixes a fixed token count: its 4x4 grid cannot become the DiT's 8x8
    mixer = {"name": "mixer_s32_224", "kwargs": {"model_kwargs": {"img_size": 128}}}
    with pytest.raises(GridMismatchError, match="teacher.interpolate_tokens"):
        make(teacher=mixer)
    m = make(teacher={**mixer, "interpolate_tokens": True})
    assert torch.isfinite(m.training_step(batch(), 0))


def test_label_outside_num_classes():
    m = make(align={"mode": "none"}, teacher=False)
    with pytest.raises(ValueError, match=r"label 6 is outside \[0, 6\)"):
        m.training_step(batch(label_max=7, n=7), 0)


def test_predict_writes_png_grids(tmp_path):
    import lightning.pytorch as pl

    m = FlowMatchingDiffusion(diffusion=DiffusionSpec(num_classes=6, backbone="dit", backbone_kwargs=DIT),
                              sampling=SamplingSpec(num_samples=6, out_dir=str(tmp_path / "samples"), steps=2,
                                                    cfg_scale=2.0, guidance_interval=(0.2, 0.9)))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(m)
    files = glob.glob(str(tmp_path / "samples" / "*.png"))
    assert len(files) == 1 and out[0]["path"] in files
    from PIL import Image

    assert Image.open(files[0]).size[0] >= 6 * 32


def test_predict_refuses_an_unwritable_sample_folder_before_sampling(tmp_path):
    import lightning.pytorch as pl

    from mmalign.training.outputs import OutputLocationError

    (tmp_path / "taken").write_text("a file where the folder should be")
    m = FlowMatchingDiffusion(diffusion=DiffusionSpec(num_classes=6, backbone="dit", backbone_kwargs=DIT),
                              sampling=SamplingSpec(num_samples=6, out_dir=str(tmp_path / "taken"), steps=2))
    sampled = []
    m.generate = lambda *a, **k: sampled.append(1)  # would record any sampling before the check
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(OutputLocationError, match="sampling.out_dir"):
        trainer.predict(m)
    assert sampled == []


def test_vae_latent_path(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(str(tmp_path / "vae"))
    m = make(diffusion={"vae_path": str(tmp_path / "vae"), "backbone_kwargs": {**DIT, "patch_size": 2}})
    assert not any(k.startswith("vae.") for k in m.state_dict()) and not m.vae.training
    assert not any(p.requires_grad for p in m.vae.parameters())
    assert m.backbone.in_channels == 4 and m.backbone.image_size == 16 and m.align_grid == 8
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert m.generate(torch.arange(2), 2, "heun", 1.0).shape == (2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="AutoencoderKL"):
        make(diffusion={"vae_path": str(tmp_path / "missing")})


def test_precomputed_teacher_features(tmp_path):
    from mmalign.repa.features import write_features

    m = make()
    b = batch()
    meta = write_features([b, b], m.teacher, str(tmp_path / "feats"), grid=m.align_grid)
    assert meta["num_samples"] == 4 and os.path.isfile(tmp_path / "feats" / "meta.json")
    m2 = make(teacher={"features": str(tmp_path / "feats"), "name": None})
    assert m2.teacher is None
    flipped = torch.tensor([False, True, False, True])
    got = m2._targets(b, None, flipped)
    imgs = torch.where(flipped[:, None, None, None], b["image"].flip(-1), b["image"])
    assert torch.allclose(got, m.teacher.encode(imgs), atol=2e-2)  # stored as float16
    assert torch.isfinite(m2.training_step(b, 0))
    with pytest.raises(KeyError, match="no precomputed"):
        m2._targets({"key": ["zzz"]}, None, torch.tensor([False]))


def _loader(n=8):
    items = [{"image": torch.rand(3, 32, 32) * 2 - 1, "label": i % 6, "key": f"k{i}"} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=4)


def _trainer(tmp_path, steps, **kw):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path), **kw)


def test_checkpoint_holds_no_frozen_networks_and_resumes(tmp_path):
    import lightning.pytorch as pl

    from mmalign.models.weights import load_checkpoint_file

    torch.manual_seed(0)
    m = make(fd=FDSpec(num_samples=4))  # FD network: the teacher's (a second frozen copy)
    assert m.fd_metric is not None and m.fd_network.startswith("FD[timm:vit_tiny_patch16_224")
    frozen = ("teacher.", "fd_metric.", "vae.")
    assert not any(k.startswith(frozen) for k in m.state_dict())
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    _trainer(tmp_path, 2, callbacks=[ckpt_cb]).fit(m, _loader())
    last = str(tmp_path / "ck" / "last.ckpt")
    ck = load_checkpoint_file(last)  # weights_only=True: hyper-parameters are plain containers
    assert not any(k.startswith(frozen) for k in ck["state_dict"])
    assert any(k.startswith("ema.module.") for k in ck["state_dict"]) and ck["hyper_parameters"]["align"]["mode"] == "repa"
    # rebuilt from the saved hyper-parameters alone; strict load does not miss the frozen networks
    m2 = FlowMatchingDiffusion.load_from_checkpoint(last, weights_only=True)
    assert m2.teacher is not None and m2.cfg == m.cfg
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    # a state dict carrying teacher weights is accepted, and the teacher stays what its source says
    before = {k: v.clone() for k, v in m2.teacher.state_dict().items()}
    m2.load_state_dict({**m.state_dict(), **{f"teacher.{k}": v + 1 for k, v in before.items()}}, strict=True)
    assert all(torch.equal(v, m2.teacher.state_dict()[k]) for k, v in before.items())
    # resume: step count, EMA and optimizer continue
    m3 = make(fd=FDSpec(num_samples=4))
    t3 = _trainer(tmp_path, 3)
    t3.fit(m3, _loader(), ckpt_path=last)
    assert t3.global_step == 3 and int(m3.ema.n_averaged) == int(ck["state_dict"]["ema.n_averaged"]) + 1


def test_frozen_networks_stay_frozen_and_in_eval(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(str(tmp_path / "vae"))
    m = make(diffusion={"vae_path": str(tmp_path / "vae"), "backbone_kwargs": {**DIT, "patch_size": 2}},
             fd=FDSpec(num_samples=4))
    m.train()
    for name in ("teacher", "fd_metric", "vae", "ema"):
        sub = getattr(m, name)
        assert not any(x.training for x in sub.modules()), name
        assert not any(p.requires_grad for p in sub.parameters()), name
    assert m.backbone.training and m.head.training
    trainable = {id(p) for p in m.trainable_parameters()}
    for name in ("teacher", "fd_metric", "vae", "ema"):
        assert trainable.isdisjoint(id(p) for p in getattr(m, name).parameters()), name


def _classifier_ckpt(path, mean=(0.5, 0.4, 0.3)):
    import lightning

    from mmalign.classify import ImageClassifier

    clf = ImageClassifier({"name": "vit_tiny_patch16_224", "kwargs": VIT["model_kwargs"]}, num_classes=6,
                          transform={"image_size": 32, "mean": mean})
    torch.save({"state_dict": clf.state_dict(), "hyper_parameters": dict(clf.hparams),
                "pytorch-lightning_version": lightning.__version__}, str(path))
    return clf


def test_teacher_architecture_from_classifier_checkpoint(tmp_path):
    clf = _classifier_ckpt(tmp_path / "teacher.ckpt")
    m = FlowMatchingDiffusion(diffusion={"num_classes": 6, "backbone_kwargs": DIT}, align={"mode": "repa", "projector_dim": 32},
                              teacher={"checkpoint": str(tmp_path / "teacher.ckpt")})  # kind classifier, no arch
    t = m.teacher
    assert t.name.startswith("classifier:vit_tiny_patch16_224") and t.embed_dim == 32 and t.grid_size == 8
    assert t.mean == (0.5, 0.4, 0.3) and t.input_size == 32  # normalisation and size from the checkpoint too
    x = torch.randn(2, 3, 32, 32)
    clf.eval()
    assert torch.allclose(t.forward_tokens(x), clf.model.forward_features(x)[:, 1:], atol=1e-5)  # its weights
    assert torch.isfinite(m.training_step(batch(), 0))
    with pytest.raises(ValueError, match="disagrees with the checkpoint's model_name"):
        make(teacher={"kind": "classifier", "checkpoint": str(tmp_path / "teacher.ckpt"), "name": "resnet18"})
    torch.save({"w": torch.zeros(1)}, str(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="no ImageClassifier hyper-parameters.*kind: timm"):
        make(teacher={"kind": "classifier", "checkpoint": str(tmp_path / "plain.pt"), "name": None})
    with pytest.raises(ValueError, match="teacher.checkpoint is null"):
        make(teacher={"kind": "classifier", "name": None})


@pytest.mark.parametrize("kw,pattern", [
    ({"align": {"mode": "repa", "weight": -1}}, r"align.weight \(lambda\) must be >= 0, got -1"),
    ({"align": {"mode": "repa", "lambda": 0.5}}, r"align: unknown option\(s\) \['lambda'\]; allowed: .*'weight'"),
    ({"align": {"mode": "rapa"}}, r"align.mode must be one of \('none', 'repa', 'urepa'\), got 'rapa'"),
    ({"sampling": {"guidance_interval": (0.8, 0.2)}}, r"guidance_interval must satisfy 0 <= lo <= hi <= 1"),
    ({"diffusion": {"ema_decay": 1.0}}, r"diffusion.ema_decay must be in \[0, 1\), got 1.0"),
    ({"diffusion": {"label_dropout": 1.5}}, r"diffusion.label_dropout must be in \[0, 1\), got 1.5"),
    ({"fd": {"num_samples": 8}}, "fd.num_samples > 0 needs an FD feature network"),
    ({"teacher": {"kind": "timmm", "name": "x"}}, r"kind must be one of \[.*'classifier'.*\], got 'timmm'"),
])
def test_bad_spec_values_are_named(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        FlowMatchingDiffusion(**kw)


def test_ema_trails_live_weights_and_is_what_sampling_uses():
    torch.manual_seed(0)
    m = make(align={"mode": "none"}, teacher=False, optim=OptimSpec(lr=1e-2), diffusion={"ema_decay": 0.9})
    opt = m.configure_optimizers()["optimizer"]
    init = [p.detach().clone() for p in m.backbone.parameters()]
    for step in range(3):
        opt.zero_grad()
        m.training_step(batch(), step).backward()
        opt.step()
        m.ema.update(m.backbone, step)
    live, ema = list(m.backbone.parameters()), list(m.ema.module.parameters())
    assert any(not torch.allclose(e, p) for e, p in zip(ema, live))  # trails the live weights
    assert any(not torch.allclose(e, p0) for e, p0 in zip(ema, init))  # but moved off the initial ones
    labels = torch.arange(2)
    first = m.generate(labels, 2, "euler", 1.0)
    with torch.no_grad():
        for p in live:
            p.add_(torch.randn_like(p))
    assert torch.equal(m.generate(labels, 2, "euler", 1.0), first)  # live weights do not matter
    with torch.no_grad():
        for p in ema:
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(m.generate(labels, 2, "euler", 1.0), first)


def test_compiled_dit_step_matches_eager():
    """``compile`` (aot_eager: dynamo capture with the alignment hook inside the graph, no codegen)."""
    def build(compile_opt):
        torch.manual_seed(0)
        return make(align={"hook_point": "transformer_blocks.1"}, compile=compile_opt)

    eager, compiled = build(False), build({"backend": "aot_eager"})
    assert eager.state_dict().keys() == compiled.state_dict().keys()  # checkpoints interchange
    losses = []
    for m in (eager, compiled):
        torch.manual_seed(1)
        losses.append(m.training_step(batch(), 0))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(eager.backbone.named_parameters(), compiled.backbone.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert compiled.head.projector.mlp[0].weight.grad is not None


def test_spec_dataclass_checks_itself():
    with pytest.raises(ValueError, match=r"align.projector_dim must be >= 1, got 0"):
        AlignSpec(mode="repa", projector_dim=0)


def test_resume_and_nan_advice_find_the_grouped_learning_rate():
    from mmalign.training.callbacks import optimizer_hparam

    m = make(align={"mode": "none"}, teacher=False, optim={"lr": 3e-4})
    assert optimizer_hparam(m.hparams, "lr") == ("optim.lr", 3e-4)
    assert optimizer_hparam({"lr": 1e-3}, "lr") == ("lr", 1e-3) and optimizer_hparam({}, "lr") == ("lr", None)


def test_validation_logs_fd_from_ema_samples(tmp_path):
    import lightning.pytorch as pl

    torch.manual_seed(0)
    m = make(fd=FDSpec(num_samples=6, sample_steps=1))
    del m.log  # the trainer records what is logged
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    out = trainer.validate(m, _loader(8))
    assert int(m.fd_metric.real_features_num_samples) == 6  # capped at num_samples, kept for the next validation
    assert out[0]["val/fd"] > 0 and int(m.fd_metric.fake_features_num_samples) == 0  # fakes reset after compute


def test_precompute_teacher_covers_every_training_key(tmp_path, data_root):
    """400 training images in batches of 64: the last 16 are written too (training shuffles, so any key is drawn)."""
    from datamodules import ImageLabelDataModule
    from mmalign.repa.precompute_command import precompute_teacher

    m = make(diffusion={"num_classes": 36})
    dm = ImageLabelDataModule(shards={"data_root": data_root, "train": "shapes/train"},
                              label={"key": "cls", "num_classes": 36}, stream={"batch_size": 64, "num_workers": 0},
                              preprocess=m.preprocess)
    meta = precompute_teacher(None, m, dm, out_dir=str(tmp_path / "feats"))
    assert meta["num_samples"] == 400
