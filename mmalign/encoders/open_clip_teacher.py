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

    def __init__(self, name: str | None, checkpoint_path: str | None = None, model_kwargs: dict[str, Any] | None = None,
                 mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                 clip: nn.Module | None = None) -> None:
        super().__init__()
        import open_clip

        if clip is None and checkpoint_path:
            clip, name = clip_from_checkpoint(checkpoint_path, name, model_kwargs)
        elif clip is None:
            if name not in open_clip.list_models():
                from mmalign.models.timm_models import close_matches

                hint = close_matches(str(name), open_clip.list_models())
                raise ValueError(f"unknown open_clip model '{name}'." + (f" Close matches: {hint}." if hint else "")
                                 + " See open_clip.list_models().")
            clip = open_clip.create_model(name, pretrained=None, **(model_kwargs or {}))
        visual = clip.visual
        if not hasattr(visual, "positional_embedding") or not hasattr(visual, "conv1"):
            raise ValueError(f"open_clip model '{name}' has a {type(visual).__name__} image tower; OpenClipTeacher takes "
                             "open_clip's own VisionTransformer (build_teacher('open_clip', ...) also takes timm towers).")
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
        for tower in ("transformer", "text"):  # the text tower is not needed
            if hasattr(clip, tower):
                delattr(clip, tower)
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


def clip_from_checkpoint(path: str, name: str | None = None, model_kwargs: dict[str, Any] | None = None):
    """``(model, name)``: the open_clip model of a CLIP checkpoint with its weights loaded, in eval mode.

    An mmalign CLIP/SigLIP checkpoint (flat or grouped layout) names its architecture, so ``name`` may be
    omitted; it is rebuilt by ``open_clip_from_checkpoint``, the one reader of such checkpoints (names
    validated, nothing else in its hyper-parameters acted on). A plain open_clip weights file needs
    ``name`` (and may take ``model_kwargs``). The teacher, the text-to-image text tower and the judge all
    come through here."""
    import open_clip

    from mmalign.checkpoint_layout import clip_hparams
    from mmalign.models.open_clip_models import open_clip_from_checkpoint
    from mmalign.models.weights import load_checkpoint_file, load_weights

    raw = load_checkpoint_file(path, mmap=True)  # weights_only: a crafted file cannot run code
    hp = clip_hparams(raw.get("hyper_parameters") if isinstance(raw, dict) else None)
    recorded = hp["model"].get("name") if hp is not None else None
    if recorded:
        if name is not None and name != recorded:
            raise ValueError(f"'{path}' is a checkpoint of open_clip model '{recorded}', not '{name}'; leave the name "
                             "unset (it is read from the checkpoint) or give the matching one.")
        if model_kwargs:
            raise ValueError(f"'{path}' is an mmalign CLIP checkpoint, which records its architecture: drop "
                             f"model_kwargs {sorted(model_kwargs)} (they apply to plain open_clip weights files).")
        clip, _ = open_clip_from_checkpoint(path)
        return clip.eval(), recorded
    if name is None:
        raise ValueError(f"'{path}' records no open_clip model name (not an mmalign CLIP checkpoint): give the "
                         "open_clip model name of these weights.")
    if name not in open_clip.list_models():
        from mmalign.models.timm_models import close_matches

        hint = close_matches(name, open_clip.list_models())
        raise ValueError(f"unknown open_clip model '{name}'." + (f" Close matches: {hint}." if hint else "")
                         + " See open_clip.list_models().")
    clip = open_clip.create_model(name, pretrained=None, **(model_kwargs or {}))
    load_weights(clip, path)
    return clip.eval(), name


def clip_image_teacher(name: str | None, checkpoint_path: str | None = None, model_kwargs: dict[str, Any] | None = None,
                       trunk_kwargs: dict[str, Any] | None = None, mean=None, std=None) -> TeacherEncoder:
    """The image tower of a CLIP as a teacher: ``OpenClipTeacher`` for open_clip's ViT, or, for a timm tower
    (the quick start's MobileNetV2), a ``TimmTeacher`` on the tower's trunk (its final feature map is the
    token grid) with the CLIP's weights and normalisation; ``trunk_kwargs`` rebuild the trunk with timm
    options that leave the weights unchanged (``output_stride: 8`` dilates it for a finer grid)."""
    import open_clip

    if checkpoint_path:
        clip, name = clip_from_checkpoint(checkpoint_path, name, model_kwargs)
    else:
        if name is None:
            raise ValueError("an open_clip teacher without a checkpoint needs its model name.")
        clip = open_clip.create_model(name, pretrained=None, **(model_kwargs or {}))
    trunk = getattr(clip.visual, "trunk", None)
    if trunk is None:
        if trunk_kwargs:
            raise ValueError(f"trunk_kwargs apply to timm image towers only; '{name}' has a {type(clip.visual).__name__}.")
        return OpenClipTeacher(name, checkpoint_path, model_kwargs, mean, std, clip=clip)
    from .timm_teacher import TimmTeacher

    cfg = open_clip.get_model_config(name) or {}
    timm_name = cfg.get("vision_cfg", {}).get("timm_model_name")
    pp = getattr(clip.visual, "preprocess_cfg", None) or {}
    teacher = TimmTeacher(timm_name, None, model_kwargs=trunk_kwargs, input_size=int(clip.visual.image_size[0]),
                          mean=tuple(mean or pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                          std=tuple(std or pp.get("std", open_clip.OPENAI_DATASET_STD)))
    sd = {k: v for k, v in trunk.state_dict().items() if not k.startswith(("classifier.", "fc.", "head."))}
    missing, unexpected = teacher.model.load_state_dict(sd, strict=False)
    if [k for k in missing if not k.startswith(("classifier.", "fc.", "head."))] or unexpected:
        raise ValueError(f"the timm trunk of '{name}' does not fit {timm_name} with {trunk_kwargs}: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}.")
    teacher.name = f"open_clip:{name} image tower ({timm_name}" + (f", {trunk_kwargs}" if trunk_kwargs else "") + \
        (f", {checkpoint_path})" if checkpoint_path else ", random init)")
    return teacher.freeze()
