"""Text-conditioned diffusion backbones from diffusers behind one call ``net(x_t, t, text) -> velocity``.

* ``mmdit``: ``diffusers.SD3Transformer2DModel``: joint attention over image tokens and text tokens
  (each stream with its own weights, one attention), the pooled text vector in the adaLN
  conditioning. The text tokens enter through the model's ``context_embedder`` (text dim ->
  hidden width); joint attention takes no text mask, so padding rows (zeros) are attended as SD3
  attends its padded T5 tokens.
* ``unet``: ``diffusers.UNet2DConditionModel``: cross-attention to the text tokens (masked to the real
  ones), the pooled vector added to the time embedding (``class_embed_type: projection``).

Time ``t`` in ``[0, 1]`` (1 = noise) is given to diffusers as ``timestep = 1000 t``, the scale their
sinusoidal embeddings were made for and the scale SoftREPA's timestep offsets index (``t // 10``).
Every diffusers call passes its inputs as keywords, so forward pre-hooks (SoftREPA's token insertion)
can read and replace them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .text import TextBatch

BACKBONES = ("mmdit", "unet")


def _mmdit(image_size: int, channels: int, text_dim: int, pooled_dim: int, **kw: Any) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    cfg = dict(patch_size=4, num_layers=6, num_attention_heads=4, attention_head_dim=32)
    cfg.update(kw)
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    # both streams of a joint block have the hidden width, so the caption projection must match it
    cfg.setdefault("caption_projection_dim", width)
    cfg.setdefault("pos_embed_max_size", image_size // cfg["patch_size"])
    return SD3Transformer2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                 joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, **cfg)


def _unet(image_size: int, channels: int, text_dim: int, pooled_dim: int, **kw: Any) -> nn.Module:
    from diffusers import UNet2DConditionModel

    widths = tuple(kw.pop("block_out_channels", (32, 64, 64)))
    n = len(widths)
    # cross-attention below full resolution: where the text decides what is drawn, cheap at 32 px
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
    up = ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]
    cfg = dict(layers_per_block=1, norm_num_groups=min(32, widths[0]), attention_head_dim=8,
               down_block_types=tuple(down), up_block_types=tuple(up))
    cfg.update(kw)
    return UNet2DConditionModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                block_out_channels=widths, cross_attention_dim=text_dim,
                                class_embed_type="projection", projection_class_embeddings_input_dim=pooled_dim,
                                **cfg)


class TextDiffusionBackbone(nn.Module):
    """A diffusers text-to-image network with the velocity call.

    Args:
        kind: ``mmdit`` or ``unet``.
        image_size: Side of the (pixel) input.
        text_dim: Width of the text tokens.
        pooled_dim: Width of the pooled text vector.
        channels: Image channels (input = output).
        kwargs: diffusers constructor overrides.
    """

    def __init__(self, kind: str, image_size: int, text_dim: int, pooled_dim: int, channels: int = 3,
                 **kwargs: Any) -> None:
        super().__init__()
        if kind not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got '{kind}'.")
        builder = _mmdit if kind == "mmdit" else _unet
        try:
            self.net = builder(image_size, channels, text_dim, pooled_dim, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{kind} backbone rejected backbone_kwargs {sorted(kwargs)}: {exc}") from exc
        self.kind, self.image_size, self.in_channels = kind, image_size, channels

    def blocks(self) -> list[nn.Module]:
        """The blocks text tokens pass through, in order (MMDiT: joint blocks)."""
        if self.kind == "mmdit":
            return list(self.net.transformer_blocks)
        return list(self.net.down_blocks) + [self.net.mid_block] + list(self.net.up_blocks)

    def forward(self, x: Tensor, t: Tensor, text: TextBatch) -> Tensor:
        timestep = (t.float() * 1000.0).expand(x.shape[0])
        if self.kind == "mmdit":
            return self.net(hidden_states=x, encoder_hidden_states=text.tokens, pooled_projections=text.pooled,
                            timestep=timestep, return_dict=False)[0]
        return self.net(sample=x, timestep=timestep, encoder_hidden_states=text.tokens, class_labels=text.pooled,
                        encoder_attention_mask=text.mask.long(), return_dict=False)[0]
