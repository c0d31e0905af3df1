"""Shared pieces of the text-to-image tests: tiny backbones, one intra-op thread, a tiny mmalign CLIP checkpoint."""

from __future__ import annotations

import pytest
import torch

MMDIT = {"num_layers": 2, "patch_size": 4, "num_attention_heads": 2, "attention_head_dim": 16}
UNET = {"block_out_channels": [8, 16, 16], "norm_num_groups": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second thread makes small convolutions 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(backbone: str = "mmdit", mmdit: dict | None = None, **kw):
    """A tiny ``TextToImageDiffusion`` (``diffusion`` updates the defaults) that logs nowhere."""
    from mmalign.t2i import TextToImageDiffusion

    torch.manual_seed(0)
    net = (mmdit or MMDIT) if backbone == "mmdit" else UNET
    m = TextToImageDiffusion(diffusion={"backbone": backbone, "backbone_kwargs": net, **kw.pop("diffusion", {})}, **kw)
    m.log = m.log_dict = lambda *a, **k: None
    return m


def tiny_clip_checkpoint(path, name: str):
    """``(path, CLIP module)``: an mmalign CLIP checkpoint with a tiny ViT and text transformer, architecture inline."""
    from mmalign.contrastive import CLIP

    cfg = {"embed_dim": 16, "custom_text": True,
           "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    clip = CLIP(model={"name": name, "cfg": cfg})
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams)}, path)
    return str(path), clip
