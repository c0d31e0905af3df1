"""Memory-flat CLIP and SigLIP: the logits are computed tile by tile and recomputed in backward.

The untiled losses keep the B x N logits (and their softmax/sigmoid) alive for backward, so memory
grows with the square of the batch. Here custom ``autograd.Function``s (the Inf-CL idea, Cheng et al.
2024, "Breaking the memory barrier") keep only the features and one number per row/column:

* CLIP: forward runs an online log-sum-exp over T x T tiles of ``s * x @ y.T``, both per row
  (image -> text) and per column (text -> image), and saves the features plus those LSEs. Backward
  recomputes each tile, forms the softmax as ``exp(logit - lse)`` and accumulates the gradients of
  the features and of the scale. Saved for backward: O((B + N) x D); live temporaries: O(T x T).
* SigLIP: forward sums ``log sigmoid`` over tiles; backward recomputes ``sigmoid`` per tile. Across
  ranks the text blocks travel around a ring (no autograd), and backward re-runs the ring carrying
  each block's gradient with it, so a rank never holds more than its own block plus one visitor.

Multi-process conventions are those of ``losses.contrastive``: rank r reports its local loss L_r
(own rows against all N columns), feature gradients are d(sum_s g_s L_s)/d(own features) with g_s
the upstream gradient of rank s, and the scale/bias gradients average over ranks (as DDP does) to
the global-batch gradient. The tiled CLIP computes only the B x N block ``x_r @ y_all.T`` once for
both directions: the column LSEs of the text -> image direction are combined over ranks with one
all-gather of N numbers, so no rank needs the other ranks' image features.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from mmalign.distributed import all_gather_no_grad, all_reduce_sum, ring_shift_no_grad


def check_tile_size(tile_size: int | None, who: str, name: str = "tile_size") -> int | None:
    """Validate a ``tile_size`` argument (called ``name`` at ``who``): ``None`` (untiled) or a positive int; returns it."""
    if tile_size is None:
        return None
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(
            f"{who}: {name} must be a positive int (the side of the square logit tiles, e.g. 256 or "
            f"1024) or None for the untiled loss, got {tile_size!r}"
        )
    return tile_size


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # exp/log-sum-exp in fp16/bf16 would lose the exactness the tiles exist to keep; F.cross_entropy
    # under autocast runs in float32 for the same reason.
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _no_autocast(device: torch.device):
    """Autocast would re-cast the tile matmuls to half precision inside the Function; turn it off."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _spans(n: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


def _as_scale(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor for the Function (a float becomes a constant; a tensor keeps its graph)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(())
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------- CLIP


class _ClipTiles(torch.autograd.Function):
    """Symmetric InfoNCE of one rank's B x N block ``s * x @ y.T`` (x: own images, y: all N texts).

    Row i (global index ``offset + i``) is both an image query over the N texts and the owner of
    text column ``offset + i``. With label smoothing eps each direction's per-query loss is
    ``lse - (1 - eps) * logit_pos - eps * mean(logits)``, as ``F.cross_entropy`` computes it.
    """

    @staticmethod
    def forward(ctx, x, y, scale, eps: float, tile: int, rank: int, world: int):
        cd = _compute_dtype(x)
        with torch.no_grad(), _no_autocast(x.device):
            xc, yc, s = x.to(cd), y.to(cd), scale.to(cd)
            b, n = xc.shape[0], yc.shape[0]
            off = rank * b
            xs = xc * s  # fold the scale into the small operand once
            row_lse = xc.new_empty(b)
            col_lse = xc.new_full((n,), float("-inf"))
            for i0, i1 in _spans(b, tile):
                acc = xc.new_full((i1 - i0,), float("-inf"))
                for j0, j1 in _spans(n, tile):
                    logits = xs[i0:i1] @ yc[j0:j1].T
                    acc = torch.logaddexp(acc, logits.logsumexp(1))
                    col_lse[j0:j1] = torch.logaddexp(col_lse[j0:j1], logits.logsumexp(0))
                row_lse[i0:i1] = acc
            if world > 1:  # every rank holds a partial column LSE over its own rows: combine them
                col_lse = all_gather_no_grad(col_lse, check_sizes=False).view(world, n).logsumexp(0)
                x_mean = all_reduce_sum(xc.sum(0)) / n
            else:
                x_mean = xc.mean(0)
            y_own = yc[off : off + b]
            pos = (xs * y_own).sum(1)
            loss_i = row_lse - (1 - eps) * pos
            loss_t = col_lse[off : off + b] - (1 - eps) * pos
            if eps:
                loss_i = loss_i - eps * (xs @ yc.mean(0))
                loss_t = loss_t - eps * s * (y_own @ x_mean)
            loss = (loss_i.mean() + loss_t.mean()) / 2
        ctx.save_for_backward(x, y, scale, row_lse, col_lse)
        ctx.eps, ctx.tile, ctx.rank, ctx.world = eps, tile, rank, world
        return loss.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        x, y, scale, row_lse, col_lse = ctx.saved_tensors
        eps, tile, world = ctx.eps, ctx.tile, ctx.world
        cd = _compute_dtype(x)
        with _no_autocast(x.device):
            xc, yc, s = x.to(cd), y.to(cd), scale.to(cd)
            b, n = xc.shape[0], yc.shape[0]
            off = ctx.rank * b
            go = grad_loss.to(cd).reshape(1)
            # Column j's text -> image loss belongs to rank j // B and is weighted by *that* rank's
            # upstream gradient; assuming all ranks pass the same one would break per-rank loss weights.
            go_all = all_gather_no_grad(go, check_sizes=False) if world > 1 else go
            w_row = go[0] / (2 * b)  # d loss / d logit = w_row * (softmax_row - target_row) + ...
            w_col = (go_all / (2 * b)).repeat_interleave(b)  # ... + w_col[j] * (softmax_col - target_col)
            xs = xc * s
            gxu = torch.zeros_like(xc)  # sum_j G_ij y_j, i.e. the image gradient before the scale
            gy = torch.zeros_like(yc)
            for i0, i1 in _spans(b, tile):
                for j0, j1 in _spans(n, tile):
                    logits = xs[i0:i1] @ yc[j0:j1].T
                    p_col = (logits - col_lse[j0:j1]).exp_()
                    g = logits.sub_(row_lse[i0:i1, None]).exp_().mul_(w_row)
                    g.addcmul_(p_col, w_col[None, j0:j1])
                    if eps:  # the uniform part of the smoothed target: eps / N on every column
                        g.sub_((eps / n) * (w_row + w_col[j0:j1]))
                    # positives (row i, column off + i) are targets of both directions, each 1 - eps
                    g.diagonal(off + i0 - j0).sub_(2 * (1 - eps) * w_row)
                    gxu[i0:i1].addmm_(g, yc[j0:j1])
                    gy[j0:j1].addmm_(g.T, xs[i0:i1])
            grad_x = (gxu * s).to(x.dtype)
            grad_s = (xc * gxu).sum().to(scale.dtype)  # d/ds of s * x.y summed with weights G
        return grad_x, gy.to(y.dtype), grad_s, None, None, None, None


def tiled_clip_loss(image_features: torch.Tensor, all_text_features: torch.Tensor,
                    logit_scale: torch.Tensor | float, rank: int, world: int, tile_size: int,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Rank ``rank``'s local CLIP loss, equal to ``ClipLoss`` without ever holding B x N logits.

    ``all_text_features`` are the N = world * B texts of the global batch, rank-major, gathered
    *with* gradients (``all_gather_with_grad``: its backward reduce-scatters the column gradients
    to their owners); in one process it is just ``text_features``. The other ranks' image features
    are not needed (see the module docstring).
    """
    b = image_features.shape[0]
    if all_text_features.shape[0] != world * b:
        raise ValueError(f"tiled_clip_loss: expected {world} x {b} text rows (world x local batch), got "
                         f"{all_text_features.shape[0]}; pass the rank-major gathered text features.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    scale = _as_scale(logit_scale, image_features)
    return _ClipTiles.apply(image_features, all_text_features, scale, float(label_smoothing),
                            int(tile_size), int(rank), int(world))


# -------------------------------------------------------------------------------------------- SigLIP
#
# Block loss over B rows and C columns: -1/B * sum_ij log sigmoid(z_ij * l_ij), l = s * x @ y.T + b,
# z = +1 at the positives (i, pos + i) and -1 elsewhere. Since log sig(t) - log sig(-t) = t, this is
# -1/B * (sum_ij log sig(-l_ij) + sum_i l_i,pos+i): the tiles need no sign matrix, and the gradient
# per logit is (sigmoid(l_ij) - [positive]) / B.


def _siglip_block_sum(xs, y, bias, tile: int, pos: int | None) -> torch.Tensor:
    """``sum log sig(z * l)`` of one block (no grad); ``pos`` = column of row 0's positive, or None."""
    total = xs.new_zeros(())
    for i0, i1 in _spans(xs.shape[0], tile):
        for j0, j1 in _spans(y.shape[0], tile):
            total += torch.nn.functional.logsigmoid(-(xs[i0:i1] @ y[j0:j1].T + bias)).sum()
    if pos is not None:
        total += (xs * y[pos : pos + xs.shape[0]]).sum() + bias * xs.shape[0]
    return total


def _siglip_block_grads(xs, y, bias, weight, tile: int, pos: int | None, gxu, gy) -> torch.Tensor:
    """Accumulate one block's gradients into ``gxu`` (before the scale) and ``gy``; returns d/d bias.

    ``weight`` is the upstream gradient over B (the per-logit factor)."""
    g_bias = xs.new_zeros(())
    for i0, i1 in _spans(xs.shape[0], tile):
        for j0, j1 in _spans(y.shape[0], tile):
            g = (xs[i0:i1] @ y[j0:j1].T).add_(bias).sigmoid_().mul_(weight)
            if pos is not None:
                g.diagonal(pos + i0 - j0).sub_(weight)
            g_bias += g.sum()
            gxu[i0:i1].addmm_(g, y[j0:j1])
            gy[j0:j1].addmm_(g.T, xs[i0:i1])
    return g_bias


class _SigLipTiles(torch.autograd.Function):
    """SigLIP of one rank's rows against the given columns (one process, or all-gathered texts)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, tile: int, pos: int):
        cd = _compute_dtype(x)
        with torch.no_grad(), _no_autocast(x.device):
            xc, s, bc = x.to(cd), scale.to(cd), bias.to(cd)
            loss = -_siglip_block_sum(xc * s, y.to(cd), bc, tile, pos) / x.shape[0]
        ctx.save_for_backward(x, y, scale, bias)
        ctx.tile, ctx.pos = tile, pos
        return loss.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        x, y, scale, bias = ctx.saved_tensors
        cd = _compute_dtype(x)
        with _no_autocast(x.device):
            xc, yc, s = x.to(cd), y.to(cd), scale.to(cd)
            gxu, gy = torch.zeros_like(xc), torch.zeros_like(yc)
            weight = grad_loss.to(cd) / x.shape[0]
            g_bias = _siglip_block_grads(xc * s, yc, bias.to(cd), weight, ctx.tile, ctx.pos, gxu, gy)
            grads = (gxu * s).to(x.dtype), gy.to(y.dtype), (xc * gxu).sum().to(scale.dtype)
        return *grads, g_bias.to(bias.dtype), None, None


class _SigLipRing(torch.autograd.Function):
    """SigLIP over W ranks with the text blocks passed rightward around the ring, W - 1 steps.

    Forward keeps only the own text block. Backward re-runs the ring: a visiting block travels
    together with the gradient accumulated for it so far, each rank adds its rows' part, and one
    last shift returns every finished block gradient to its owner (W shifts in all).
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, tile: int, world: int):
        cd = _compute_dtype(x)
        with torch.no_grad(), _no_autocast(x.device):
            xs, yc, bc = x.to(cd) * scale.to(cd), y.to(cd), bias.to(cd)
            total = _siglip_block_sum(xs, yc, bc, tile, pos=0)  # own block: the only positives
            block = yc
            for _ in range(world - 1):
                block = ring_shift_no_grad(block, direction=1)
                total += _siglip_block_sum(xs, block, bc, tile, pos=None)
        ctx.save_for_backward(x, y, scale, bias)
        ctx.tile, ctx.world = tile, world
        return (-total / x.shape[0]).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        x, y, scale, bias = ctx.saved_tensors
        cd = _compute_dtype(x)
        with _no_autocast(x.device):
            xc, s, bc = x.to(cd), scale.to(cd), bias.to(cd)
            xs, b = xc * s, x.shape[0]
            weight = grad_loss.to(cd) / b
            gxu = torch.zeros_like(xc)
            block, g_block = y.to(cd), torch.zeros_like(xc)
            g_bias = xc.new_zeros(())
            for k in range(ctx.world):
                if k:  # one message per step: the visitor and its gradient so far
                    block, g_block = ring_shift_no_grad(torch.cat([block, g_block]), direction=1).split(b)
                g_bias += _siglip_block_grads(xs, block, bc, weight, ctx.tile, 0 if k == 0 else None,
                                              gxu, g_block)
            # Rank r now holds block r + 1's finished gradient; its left neighbour holds ours.
            g_y = ring_shift_no_grad(g_block, direction=1)
            grads = (gxu * s).to(x.dtype), g_y.to(y.dtype), (xc * gxu).sum().to(scale.dtype)
        return *grads, g_bias.to(bias.dtype), None, None


def tiled_siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                      logit_bias: torch.Tensor | float, rank: int, world: int, tile_size: int,
                      exchange: str = "ring") -> torch.Tensor:
    """Rank ``rank``'s local SigLIP loss, equal to ``SigLipLoss`` without holding any B x B block.

    ``text_features`` are this rank's own B texts. ``exchange="gather"`` all-gathers the texts with
    gradients (O(N x D) memory, one collective each way); ``"ring"`` keeps O(B x D) and needs
    W - 1 shifts forward and W backward.
    """
    scale, bias = _as_scale(logit_scale, image_features), _as_scale(logit_bias, image_features)
    if world == 1:
        return _SigLipTiles.apply(image_features, text_features, scale, bias, int(tile_size), 0)
    if exchange == "gather":
        from mmalign.distributed import all_gather_with_grad

        all_text = all_gather_with_grad(text_features, check_sizes=False)
        return _SigLipTiles.apply(image_features, all_text, scale, bias, int(tile_size),
                                  rank * image_features.shape[0])
    if exchange != "ring":
        raise ValueError(f"exchange must be 'ring' or 'gather', got {exchange!r}")
    return _SigLipRing.apply(image_features, text_features, scale, bias, int(tile_size), int(world))
