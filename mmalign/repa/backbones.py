"""Diffusion backbones from diffusers behind one call ``net(x_t, t, labels) -> velocity``.

* ``dit``: ``diffusers.DiTTransformer2DModel`` (adaLN-zero blocks, class-conditional). Hook points
  ``transformer_blocks.<i>``: the output of block ``i`` (0-based), i.e. "after block k = i + 1"
  in REPA's counting.
* ``unet``: ``diffusers.UNet2DModel`` with a class embedding. Hook points ``mid_block`` (U-REPA's
  lowest-resolution stage), ``down_blocks.<i>``, ``up_blocks.<i>``.

Time ``t`` in ``[0, 1]`` (1 = pure noise) is fed to diffusers' sinusoidal embeddings as ``1000 t``,
the scale their frequencies were designed for. Label ``num_classes`` is the null (unconditional)
class used by classifier-free guidance; label dropout is done by the LightningModule, so diffusers'
own DiT label dropout is switched off here (it would drop labels a second time).

``HookCapture`` keeps a hook point's output during the velocity forward, so alignment needs no
second pass and no copy of diffusers' forward code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

BACKBONES = ("dit", "unet")


class HookPointError(ValueError):
    """A hook point that does not exist in the backbone."""


def _dit(image_size: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    cfg = dict(num_attention_heads=4, attention_head_dim=32, num_layers=6, patch_size=4, norm_num_groups=32)
    cfg.update(kw)
    net = DiTTransformer2DModel(in_channels=in_channels, out_channels=in_channels, sample_size=image_size,
                                num_embeds_ada_norm=num_classes, **cfg)
    for block in net.transformer_blocks:
        emb = block.norm1.emb.class_embedder
        if emb.embedding_table.num_embeddings != num_classes + 1:
            raise RuntimeError("diffusers' DiT label embedding has no null class row; CFG needs one.")
        emb.dropout_prob = 0.0
    return net


def _unet(image_size: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    from diffusers import UNet2DModel

    channels = tuple(kw.pop("block_out_channels", (32, 64, 64, 128)))
    n = len(channels)
    # attention only at the two lowest resolutions: cheap at 32 px and where global context matters
    down = ["DownBlock2D"] * max(0, n - 2) + ["AttnDownBlock2D"] * min(2, n)
    up = ["AttnUpBlock2D"] * min(2, n) + ["UpBlock2D"] * max(0, n - 2)
    cfg = dict(layers_per_block=1, norm_num_groups=min(32, channels[0]), attention_head_dim=8,
               down_block_types=tuple(down), up_block_types=tuple(up))
    cfg.update(kw)
    return UNet2DModel(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=channels, num_class_embeds=num_classes + 1, **cfg)


class DiffusionBackbone(nn.Module):
    """A diffusers network with the velocity call and named hook points.

    Args:
        kind: ``dit`` or ``unet``.
        image_size: Side of the (pixel or latent) input.
        in_channels: Input = output channels (3 for pixels, the VAE's latent channels otherwise).
        num_classes: Real classes; index ``num_classes`` is the null class.
        kwargs: diffusers constructor overrides (e.g. ``num_layers``, ``block_out_channels``).
    """

    def __init__(self, kind: str, image_size: int, in_channels: int, num_classes: int, **kwargs: Any) -> None:
        super().__init__()
        if kind not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got '{kind}'.")
        builder = _dit if kind == "dit" else _unet
        try:
            self.net = builder(image_size, in_channels, num_classes, **kwargs)
        except TypeError as exc:
            raise ValueError(f"{kind} backbone rejected backbone_kwargs {sorted(kwargs)}: {exc}") from exc
        self.kind, self.num_classes, self.image_size, self.in_channels = kind, num_classes, image_size, in_channels

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        timestep = (t.float() * 1000.0).expand(x.shape[0])
        if self.kind == "dit":
            return self.net(x, timestep=timestep, class_labels=labels, return_dict=False)[0]
        return self.net(x, timestep, class_labels=labels, return_dict=False)[0]

    def hook_points(self) -> list[str]:
        if self.kind == "dit":
            return [f"transformer_blocks.{i}" for i in range(len(self.net.transformer_blocks))]
        names = [f"down_blocks.{i}" for i in range(len(self.net.down_blocks))]
        names += ["mid_block"] if self.net.mid_block is not None else []
        return names + [f"up_blocks.{i}" for i in range(len(self.net.up_blocks))]

    def default_hook_point(self) -> str:
        if self.kind == "unet":
            return "mid_block"
        # REPA aligns after block 8 of 28 (XL) and 4 of 12 (B): about a third of the depth
        depth = len(self.net.transformer_blocks)
        return f"transformer_blocks.{max(0, round(depth / 3) - 1)}"

    def hook_module(self, name: str) -> nn.Module:
        valid = self.hook_points()
        if name not in valid:
            raise HookPointError(f"hook point '{name}' does not exist in the {self.kind} backbone "
                                 f"({type(self.net).__name__}); valid hook points: {valid}.")
        return self.net.get_submodule(name)


@torch.no_grad()
def probe_hook(backbone: DiffusionBackbone, module: nn.Module) -> tuple[int, ...]:
    """Shape of ``module``'s output for one dummy input (hook grid and width before training)."""
    seen: list[tuple[int, ...]] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(tuple((o[0] if isinstance(o, tuple) else o).shape)))
    try:
        p = next(backbone.parameters())
        x = torch.zeros(1, backbone.in_channels, backbone.image_size, backbone.image_size, device=p.device)
        backbone(x, torch.full((1,), 0.5, device=p.device), torch.zeros(1, dtype=torch.long, device=p.device))
    finally:
        handle.remove()
    return seen[0]


class HookCapture:
    """Forward hook that keeps the output of one backbone module while ``active``.

    The hook stores a reference (no copy), so the alignment loss back-propagates into exactly the
    blocks up to the hook point.
    """

    def __init__(self, module: nn.Module) -> None:
        self.active = False
        self.value: Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output) -> None:
        if self.active:
            self.value = output[0] if isinstance(output, tuple) else output

    def pop(self) -> Tensor:
        if self.value is None:
            raise RuntimeError("the alignment hook captured nothing: the hooked module did not run in this forward.")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()
