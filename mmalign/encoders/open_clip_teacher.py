"""The image tower of an open_clip model (by name, weights from a local checkpoint file) as a teacher."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import GridMismatchError, TeacherEncoder


class OpenClipTeacher(TeacherEncoder):
    """``open_clip.create_model(name).visual`` with the CLIP checkpoint's weights, frozen.

    Tokens are the ViT's patch tokens after ``ln_post`` (before the projection), CLS dropped.
    Changing the grid resamples the position embedding (bicubic), as open_clip does when loading
    a checkpoint at another resolution.

    Args:
        name: open_clip model name (``open_clip.list_models()``).
        checkpoint_path: Local open_clip checkpoint file (full CLIP state dict, possibly wrapped in
            ``state_dict`` / prefixed by ``module.``); only the ``visual.*`` weights are used.
        model_kwargs: Overrides of the model config (e.g. a small ``vision_cfg``/``text_cfg``).
    """

    def __init__(self, name: str, checkpoint_path: str | None = None, model_kwargs: dict[str, Any] | None = None,
                 mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None) -> None:
        super().__init__()
        import open_clip

        if name not in open_clip.list_models() and checkpoint_path:
            _register_from_mmalign_checkpoint(name, checkpoint_path)
        if name not in open_clip.list_models():
            from mmalign.models.timm_models import close_matches

            hint = close_matches(name, open_clip.list_models())
            raise ValueError(f"unknown open_clip model '{name}'." + (f" Close matches: {hint}." if hint else "")
                             + " See open_clip.list_models().")
        clip = open_clip.create_model(name, pretrained=None, **(model_kwargs or {}))
        if checkpoint_path:
            from mmalign.models.weights import load_weights

            load_weights(clip, checkpoint_path)
        visual = clip.visual
        if not hasattr(visual, "positional_embedding") or not hasattr(visual, "conv1"):
            raise ValueError(f"open_clip model '{name}' has a {type(visual).__name__} image tower; only open_clip's "
                             "own VisionTransformer is supported as a teacher (use kind: timm for timm towers).")
        self.model = visual
        self.model.output_tokens = True
        self.name = f"open_clip:{name}" + (f" ({checkpoint_path})" if checkpoint_path else " (random init)")
        pp = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(mean or pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(std or pp.get("std", open_clip.OPENAI_DATASET_STD))
        self.stride = int(visual.patch_size[0])
        self.input_size = int(visual.image_size[0])
        self.embed_dim = int(visual.conv1.out_channels)
        self.num_prefix_tokens = 0  # _features already drops CLS
        self.resizable = getattr(visual, "pool_type", "tok") in ("tok", "avg") and visual.attn_pool is None
        del clip.transformer  # the text tower is not needed
        self.freeze()

    def _features(self, images: Tensor) -> Tensor:
        pooled, tokens = self.model(images)
        if tokens.shape[1] != self.grid_size ** 2:
            raise GridMismatchError(f"open_clip tower returned {tokens.shape[1]} tokens, expected {self.grid_size ** 2}.")
        return tokens

    def _resize(self, input_size: int) -> None:
        v = self.model
        old = int(v.grid_size[0])
        new = input_size // self.stride
        pos = v.positional_embedding.data
        cls, grid = pos[:1], pos[1:]
        if grid.shape[0] != old * old:
            raise GridMismatchError(f"open_clip tower position embedding has {grid.shape[0]} entries, not {old}x{old}.")
        grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos.dtype)
        v.positional_embedding = nn.Parameter(torch.cat([cls, grid]), requires_grad=False)
        v.grid_size = (new, new)
        v.image_size = (input_size, input_size)
        assert math.isqrt(v.positional_embedding.shape[0] - 1) == new


def _register_from_mmalign_checkpoint(name: str, path: str) -> None:
    """An mmalign CLIP/SigLIP checkpoint carries its (possibly inline) architecture in its
    hyper-parameters: register it so its image tower can teach."""
    from mmalign.checkpoint_layout import clip_hparams
    from mmalign.models.weights import load_checkpoint_file
    from mmalign.models.open_clip_models import register_model_config, resolve_text_paths

    raw = load_checkpoint_file(path, mmap=True)  # weights_only: a crafted file cannot run code
    hp = clip_hparams(raw.get("hyper_parameters") if isinstance(raw, dict) else None) or {"model": {}}
    if hp["model"].get("name") == name and hp["model"].get("cfg"):
        register_model_config(name, resolve_text_paths(hp["model"]["cfg"]))
