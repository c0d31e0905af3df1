"""SoftREPA ("Aligning Text to Image in Diffusion Models is Easier Than You Think"): soft text tokens and
the contrastive denoising loss, for a frozen text-to-image backbone.

Only the soft tokens train. ``SoftTokens.attach(backbone)`` inserts them with forward hooks, never with
a copy of diffusers' forward code (the official code copies it and so pins one diffusers version):

* MMDiT (``SD3Transformer2DModel``): a pre-hook on the model reads the timestep; a pre-hook on each of
  the first ``n_layers`` joint blocks prepends that block's tokens to the text stream, and a forward
  hook on the block strips them from its text output, so the next block sees only its own. The tokens
  live in the text-feature space and pass through the frozen ``context_embedder`` (as in the paper);
  the timestep offsets ``nn.Embedding(100, width * n_layers)`` are added after it, indexed by
  ``floor(1000 t) // 10``.
* U-Net (``UNet2DConditionModel``): one set of tokens (plus offsets ``nn.Embedding(100, width)``)
  inserted after the first text token of the cross-attention blocks of the chosen stages; the
  attention mask grows with them.

``detach()`` removes every hook: the backbone is then exactly the base model again.

Loss (per step): one ``t`` and one noise for the whole batch; each image, noised with them, is
denoised under every caption of the batch: ``E[b, p] = mean((v_target_b - v(x_t_b, caption_p))^2)``,
``logits = scale * exp(-E / tau)``, ``L = CE(logits, diagonal) + dweight * mean(diag E)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .text import TextBatch

STAGES = ("down", "mid", "up")


def offset_index(timestep: Tensor) -> Tensor:
    """``timestep`` in ``[0, 1000]`` -> offset rows ``[0, 99]`` (1000 itself shares row 99 with 990-999)."""
    return (timestep.detach().float().floor().long() // 10).clamp(0, 99)


class SoftTokens(nn.Module):
    """Learnable soft text tokens (and timestep offsets) for one backbone.

    Args:
        backbone: A ``TextDiffusionBackbone`` (its sizes are read; it is not registered as a child, so
            this module's state dict holds the soft tokens only).
        n_layers: MMDiT: joint blocks that get tokens (the first ``n_layers``).
        n_tokens: Tokens per block.
        unet_stages: U-Net: stages whose cross-attention blocks see the tokens.
        timestep_offsets: Add the ``t``-indexed offsets.
        init_std: Initial standard deviation (paper: 0.02).
    """

    def __init__(self, backbone: nn.Module, n_layers: int = 5, n_tokens: int = 4,
                 unet_stages: Sequence[str] = ("down",), timestep_offsets: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        net, self.kind = backbone.net, backbone.kind
        self.n_tokens = n_tokens
        if self.kind == "mmdit":
            depth = len(net.transformer_blocks)
            if not 1 <= n_layers <= depth:
                raise ValueError(f"softrepa.n_layers must be in [1, {depth}] (the MMDiT has {depth} joint blocks), "
                                 f"got {n_layers}.")
            self.n_layers, token_dim = n_layers, int(net.config.joint_attention_dim)
            offset_dim = int(net.config.caption_projection_dim) * n_layers
        else:
            bad = [s for s in unet_stages if s not in STAGES]
            if bad or not unet_stages:
                raise ValueError(f"softrepa.unet_stages must be a non-empty subset of {list(STAGES)}, got {list(unet_stages)}.")
            self.n_layers, token_dim = 1, int(net.config.cross_attention_dim)
            offset_dim = token_dim
        self.stages = tuple(unet_stages)
        self.tokens = nn.Parameter(torch.randn(self.n_layers, n_tokens, token_dim) * init_std)
        self.offsets = None
        if timestep_offsets:
            self.offsets = nn.Embedding(100, offset_dim)
            nn.init.normal_(self.offsets.weight, std=init_std)
        self._handles: list = []
        self._timestep: Tensor | None = None
        self._embed: list[nn.Module] = []  # the frozen context embedder, kept out of this module's children

    # ------------------------------------------------------------------ hooks
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, backbone: nn.Module) -> "SoftTokens":
        if self.attached:
            raise RuntimeError("soft tokens are already attached; detach() first.")
        net = backbone.net
        self._handles.append(net.register_forward_pre_hook(self._read_timestep, with_kwargs=True))
        if self.kind == "mmdit":
            self._embed = [net.context_embedder]
            for i, block in enumerate(net.transformer_blocks[: self.n_layers]):
                self._handles.append(block.register_forward_pre_hook(self._prepend(i), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._strip))
        else:
            modules = {"down": list(net.down_blocks), "mid": [net.mid_block], "up": list(net.up_blocks)}
            chosen = [m for s in self.stages for m in modules[s] if getattr(m, "has_cross_attention", False)]
            if not chosen:
                raise ValueError(f"the U-Net has no cross-attention block in stages {list(self.stages)}.")
            for block in chosen:
                self._handles.append(block.register_forward_pre_hook(self._insert_after_first, with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._embed, self._timestep = [], [], None

    def _read_timestep(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self._timestep = torch.as_tensor(t)

    def _block_tokens(self, layer: int, batch: int, device, dtype) -> Tensor:
        tok = self.tokens[layer]
        if self._embed:
            tok = self._embed[0](tok)  # text-feature space -> the joint stream's width (frozen)
        tok = tok.unsqueeze(0).expand(batch, -1, -1)
        if self.offsets is not None:
            if self._timestep is None:
                raise RuntimeError("soft tokens saw no timestep: call the backbone itself, not one of its blocks.")
            rows = self.offsets(offset_index(self._timestep.to(device)).expand(batch))  # (B, width * n_layers)
            tok = tok + rows.chunk(self.n_layers, dim=-1)[layer].unsqueeze(1)
        return tok.to(dtype)

    def _prepend(self, layer: int):
        def hook(module, args, kwargs):
            if "encoder_hidden_states" in kwargs:
                ehs = kwargs["encoder_hidden_states"]
                kwargs = {**kwargs, "encoder_hidden_states": torch.cat(
                    [self._block_tokens(layer, ehs.shape[0], ehs.device, ehs.dtype), ehs], 1)}
            else:  # the gradient-checkpointing path passes (hidden, encoder_hidden, temb, kwargs) positionally
                ehs = args[1]
                args = (args[0], torch.cat([self._block_tokens(layer, ehs.shape[0], ehs.device, ehs.dtype), ehs], 1),
                        *args[2:])
            return args, kwargs

        return hook

    def _strip(self, module, args, output):
        ehs, hidden = output
        return (None if ehs is None else ehs[:, self.n_tokens:]), hidden

    def _insert_after_first(self, module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None:
            return None
        soft = self._block_tokens(0, ehs.shape[0], ehs.device, ehs.dtype)
        new = {**kwargs, "encoder_hidden_states": torch.cat([ehs[:, :1], soft, ehs[:, 1:]], 1)}
        bias = kwargs.get("encoder_attention_mask")
        if bias is not None:  # (B, 1, L) additive bias made by the U-Net: 0 = attend
            keep = torch.zeros(bias.shape[0], bias.shape[1], self.n_tokens, device=bias.device, dtype=bias.dtype)
            new["encoder_attention_mask"] = torch.cat([bias[..., :1], keep, bias[..., 1:]], -1)
        return args, new


# ---------------------------------------------------------------------- the loss
VelocityFn = Callable[[Tensor, Tensor, TextBatch], Tensor]


def error_matrix(velocity: VelocityFn, images: Tensor, noise: Tensor, t: Tensor, text: TextBatch,
                 chunk: int | None = None) -> Tensor:
    """``E[b, p]``: the velocity MSE of image ``b`` (noised with the shared ``noise`` at the shared ``t``)
    denoised under caption ``p``; ``(B, B)``, computed as B*B rows in chunks of ``chunk``."""
    b = images.shape[0]
    if len(text) != b:
        raise ValueError(f"{b} images but {len(text)} captions: SoftREPA pairs every image with every caption of its batch.")
    t = t.reshape(()).to(images)
    x_t = (1 - t) * images + t * noise.expand_as(images)
    target = noise.expand_as(images) - images
    img = torch.arange(b, device=images.device).repeat_interleave(b)  # row b * B + p = (image b, caption p)
    cap = torch.arange(b, device=images.device).repeat(b)
    step = chunk or b * b
    errs = []
    for s in range(0, b * b, step):
        i, c = img[s: s + step], cap[s: s + step]
        pred = velocity(x_t[i], t.expand(len(i)), text.index(c))
        errs.append((pred.float() - target[i].float()).pow(2).flatten(1).mean(1))
    return torch.cat(errs).view(b, b)


def softrepa_loss(errors: Tensor, tau: float = 0.07, scale: float = 4.0, dweight: float = 0.0) -> Tensor:
    """Cross-entropy of ``scale * exp(-E / tau)`` with the matching caption (the diagonal) as the class,
    plus ``dweight`` times the mean matching error."""
    labels = torch.arange(errors.shape[0], device=errors.device)
    loss = F.cross_entropy(scale * torch.exp(-errors / tau), labels)
    return loss + dweight * errors.diagonal().mean() if dweight else loss
