"""TextToImageDiffusion: the text encoder and its cache, caption dropout, both backbones, validation with FD and
the judge, captioned predict grids, checkpoints, specs."""

import glob
import os

import pytest
import torch
from PIL import Image

from mmalign.t2i import TextToImageDiffusion
from mmalign.t2i.text import FrozenTextEncoder

from tests._t2i import MMDIT, make, one_thread, tiny_clip_checkpoint  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """An mmalign CLIP checkpoint with a tiny ViT and text transformer (judge, FD network, text tower)."""
    return tiny_clip_checkpoint(tmp_path_factory.mktemp("clip") / "clip.ckpt", "mmalign-t2i-tiny")


def test_text_features_are_cached_and_independent_of_the_batch():
    enc = FrozenTextEncoder(max_tokens=12)
    rows = []
    enc.hf.register_forward_pre_hook(lambda m, a, kw: rows.append(len(kw["input_ids"])), with_kwargs=True)
    a = enc(["a red circle", "a small blue star in the top left on a black background"])
    b = enc(["a red circle", ""])
    assert rows == [2, 1]  # the second call ran the transformer for "" only
    assert torch.equal(a.tokens[0], b.tokens[0]) and torch.equal(a.pooled[0], b.pooled[0])
    assert a.mask[0].sum() == 5 and a.mask[1].sum() == 12  # [CLS] a red circle [SEP]; the long one truncated
    assert b.mask[1].sum() == 2 and torch.all(b.tokens[1, 2:] == 0)  # the empty caption: [CLS] [SEP], zero padding
    torch.testing.assert_close(a.pooled.norm(dim=-1), torch.ones(2))
    assert not any(p.requires_grad for p in enc.parameters())


def test_clip_text_tower_as_the_text_encoder(tiny_clip):
    path, clip = tiny_clip
    enc = FrozenTextEncoder(clip_checkpoint=path, max_tokens=8)
    out = enc(["a red circle", "a blue star"])
    import open_clip

    ref = clip.model.encode_text(open_clip.get_tokenizer("mmalign-t2i-tiny")(["a red circle", "a blue star"]),
                                 normalize=True)
    torch.testing.assert_close(out.pooled, ref, atol=1e-5, rtol=1e-4)
    assert out.tokens.shape == (2, 8, 32) and out.mask[0].sum() == 5  # <start> a red circle <end>


@pytest.mark.parametrize("p,expect_empty", [(1.0, 4), (0.0, 0)])
def test_caption_dropout_feeds_empty_captions(p, expect_empty):
    m = make(diffusion={"caption_dropout": p})
    seen = []
    encode = m.encode_text
    m.encode_text = lambda caps: (seen.extend(caps), encode(caps))[1]
    m.training_step({"image": torch.rand(4, 3, 32, 32) * 2 - 1, "text": ["a red circle"] * 4}, 0)
    assert sum(c == "" for c in seen) == expect_empty


@pytest.mark.parametrize("backbone", ["mmdit", "unet"])
def test_both_backbones_learn_and_follow_the_caption(backbone):
    """A few steps on two fixed image-caption pairs lower the loss, and the prediction depends on the caption."""
    m = make(backbone, diffusion={"caption_dropout": 0.0}, optim={"lr": 3e-3, "schedule": "constant"})
    opt = m.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "text": ["a red circle", "a blue star"]}

    def fixed_loss():  # the same noise and t before and after training
        torch.manual_seed(123)
        with torch.no_grad():
            return float(sum(m.training_step(batch, 0) for _ in range(3)))

    before = fixed_loss()
    for _ in range(8):
        loss = m.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < before
    x, t = torch.randn(1, 3, 32, 32), torch.full((1,), 0.5)
    with torch.no_grad():
        a, b = (m.backbone(x, t, m.encode_text([c])) for c in ("a red circle", "a blue star"))
    assert not torch.allclose(a, b, atol=1e-4)


def test_validation_logs_fd_and_judge_metrics_and_predict_writes_captioned_grids(tiny_clip, in_tmp, data_root):
    import lightning.pytorch as pl

    from datamodules import ImageTextDataModule

    path, _ = tiny_clip
    m = TextToImageDiffusion(diffusion={"backbone_kwargs": MMDIT},
                             judge={"checkpoint": path, "prompts": f"{data_root}/shapes", "images_per_prompt": 1,
                                    "sample_steps": 2},
                             fd={"network": {"kind": "open_clip", "checkpoint": path}, "num_samples": 16,
                                 "sample_steps": 2},
                             sampling={"steps": 2, "num_samples": 6, "grid_cols": 3, "out_dir": str(in_tmp / "grids")})
    dm = ImageTextDataModule(shards={"data_root": data_root, "train": "shapes/train", "val": "shapes/val"},
                             stream={"batch_size": 8, "num_workers": 0}, preprocess=m.preprocess)
    trainer = pl.Trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=2,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, datamodule=dm)
    got = trainer.callback_metrics
    assert float(got["val/fd"]) > 0 and len(m._fd_captions) == 16
    for key in ("seen/acc", "heldout/acc", "seen/acc_colour", "heldout/acc_shape", "all/clip_score"):
        assert f"val/align/{key}" in got, key
    assert not any(k.startswith(("text_encoder", "judge_net", "fd_metric")) for k in m.state_dict())
    trainer.predict(m)  # no predict shards: the prompt set's prompts
    grids = sorted(glob.glob(str(in_tmp / "grids" / "*.png")))
    assert len(grids) == 1
    w, h = Image.open(grids[0]).size
    assert w == 3 * 96 and h > 2 * 96  # 6 images, 3 columns of 96-px tiles, a caption strip under each row


def test_checkpoint_roundtrip_keeps_ema_and_drops_frozen_networks(tmp_path):
    import lightning.pytorch as pl

    m = make()
    path = tmp_path / "m.ckpt"
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(m)
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert any(k.startswith("ema.module.") for k in raw["state_dict"])
    assert not any(k.startswith("text_encoder") for k in raw["state_dict"])
    back = TextToImageDiffusion.load_from_checkpoint(path, weights_only=True)
    assert back.cfg == m.cfg
    for (n, p), q in zip(back.backbone.named_parameters(), m.backbone.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("kw,pattern", [
    ({"diffusion": {"backbone": "dit"}}, r"diffusion.backbone must be one of \['mmdit', 'unet'\], got 'dit'"),
    ({"diffusion": {"caption_dropout": 1.5}}, r"diffusion.caption_dropout must be in \[0, 1\]"),
    ({"text": {"max_tokens": 1}}, r"text.max_tokens must be >= 2"),
    ({"softrepa": {"n_tokens": 0}, "init_checkpoint": "x"}, r"softrepa.n_tokens must be > 0, got 0"),
    ({"softrepa": {"t_range": [0.5, 0.2]}, "init_checkpoint": "x"}, r"softrepa.t_range must satisfy"),
    ({"softrepa": {"unet_stages": ["left"]}, "init_checkpoint": "x"}, r"softrepa.unet_stages must be"),
    ({"judge": {"images_per_prompt": 0}}, r"judge.images_per_prompt must be > 0"),
    ({"judge": {"checkpoint": "c.ckpt"}}, r"judge.prompts is null"),
    ({"fd": {"num_samples": 10}}, r"fd.num_samples > 0 needs fd.network"),
])
def test_bad_specs_are_named(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        TextToImageDiffusion(**kw)


def test_unknown_text_model_folder():
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        TextToImageDiffusion(text={"model": os.path.join("no", "such", "model")})
