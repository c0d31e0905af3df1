"""Gradient accumulation that keeps every negative: a feature cache (GradCache-style).

Plain accumulation over k micro-batches of size B gives k separate contrastive losses, each with only
B (or W*B) candidates: fewer negatives than one batch of k*B, hence a different (worse) objective. A
contrastive loss does not decompose over samples, but it only touches the encoders through their
output features, so the gradient can be computed in two passes:

1. encode every micro-batch without a graph and concatenate the features (cheap in memory);
2. compute the loss on the concatenated features with gradients *with respect to the features*;
3. re-encode each micro-batch with a graph and backpropagate the slice of the feature gradient that
   belongs to it: ``d loss / d theta = sum_m (d loss / d f_m) (d f_m / d theta)`` (chain rule).

The parameter gradients then equal those of one big batch of k*B with all k*B negatives, at the cost
of one extra forward pass and the activation memory of a single micro-batch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

import torch


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    # CUDA states only once CUDA is in use: querying them would otherwise initialise it.
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _as_features(out: Any, index: int) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        out = (out,)
    if not isinstance(out, (tuple, list)) or not out or not all(isinstance(t, torch.Tensor) for t in out):
        raise TypeError(
            f"encode(micro_batches[{index}]) must return a tensor or a non-empty tuple of tensors "
            f"(e.g. (image_features, text_features)), got {type(out).__name__}"
        )
    return tuple(out)


def feature_cache_backward(
    encode: Callable[[Any], Sequence[torch.Tensor]],
    micro_batches: Sequence[Any],
    loss_fn: Callable[..., torch.Tensor],
    *,
    preserve_rng: bool = True,
    no_sync: Callable[[], ContextManager] | None = None,
    check_rerun: bool = False,
    rerun_atol: float = 1e-5,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` on all micro-batches concatenated.

    Args:
        encode: maps one micro-batch to a tuple of feature tensors ``[B_m, D]`` (e.g. image and text
            features), each with a graph to the parameters that need gradients. Outputs that do not
            require grad (a frozen tower) are cached but get no backward.
        micro_batches: the k micro-batches; they may differ in size.
        loss_fn: ``loss_fn(*features) -> scalar`` on the features of all micro-batches concatenated
            along dim 0 (in ``micro_batches`` order). It may close over learnable loss parameters
            (logit scale/bias): they receive their gradient in the loss backward, since they are not
            part of ``encode``. It may gather across ranks (the distributed losses do): the cached
            features are then this rank's k*B rows of the global batch.
        preserve_rng: save the CPU/CUDA RNG state before each micro-batch in the first pass and
            restore it for the re-run, so dropout/random augmentation inside ``encode`` draws the same
            masks twice. Without it the re-run features differ from the cached ones and the gradient
            is that of a different sample. Afterwards the RNG continues from where the first pass
            left it. (Other device RNGs and stateful layers are not covered: batch-norm in train mode
            updates its running stats twice.)
        no_sync: e.g. ``ddp_model.no_sync``; entered for every re-run but the last so DDP all-reduces
            the encoder gradients once, after they are fully accumulated.
        check_rerun: compare the re-run features with the cached ones and raise if they differ by
            more than ``rerun_atol`` (a host sync per micro-batch; for debugging non-determinism).

    Returns:
        The loss value, detached. The caller steps the optimizer afterwards.

    Under DDP, parameters that only ``loss_fn`` uses are invisible to DDP's gradient hooks; average
    their gradient over ranks yourself (``mmalign.distributed.all_reduce_sum(p.grad) / world``) if
    DDP does not own them, exactly as DDP does for the encoder.
    """
    if len(micro_batches) == 0:
        raise ValueError("feature_cache_backward needs at least one micro-batch, got an empty sequence")
    if not rerun_atol >= 0:
        raise ValueError(f"rerun_atol must be >= 0, got {rerun_atol!r}")

    # Pass 1: features of every micro-batch, no activations kept.
    states, cached = [], []
    for i, micro_batch in enumerate(micro_batches):
        states.append(_rng_state() if preserve_rng else None)
        with torch.no_grad():
            feats = _as_features(encode(micro_batch), i)
        if cached and len(feats) != len(cached[0]):
            raise ValueError(f"encode returned {len(feats)} tensors for micro-batch {i} but "
                             f"{len(cached[0])} for micro-batch 0; it must return the same number every time")
        cached.append([f.detach() for f in feats])
    sizes = [[f.shape[0] for f in feats] for feats in cached]
    after_first_pass = _rng_state() if preserve_rng else None

    # Loss on all features at once: this is where all k*B (times W) negatives meet.
    leaves = [torch.cat([feats[j] for feats in cached]).requires_grad_(True) for j in range(len(cached[0]))]
    loss = loss_fn(*leaves)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                         f"{tuple(getattr(loss, 'shape', ()))}")
    loss.backward()  # also gives loss-only parameters (logit scale/bias) their gradient
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    del leaves  # the loss graph is freed; only the feature gradients are needed from here on
    if not check_rerun:
        del cached

    # Pass 2: re-encode with a graph, one micro-batch at a time, and push the cached gradients in.
    offsets = [0] * len(grads)
    last = len(micro_batches) - 1
    for i, micro_batch in enumerate(micro_batches):
        if preserve_rng:
            _set_rng_state(states[i])
        sync_ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
        with sync_ctx:
            feats = _as_features(encode(micro_batch), i)
            outputs, output_grads = [], []
            for j, f in enumerate(feats):
                if f.shape[0] != sizes[i][j]:
                    raise RuntimeError(f"encode(micro_batches[{i}]) output {j} has {f.shape[0]} rows on the "
                                       f"re-run but {sizes[i][j]} on the first pass; encode must be deterministic")
                g = grads[j][offsets[j] : offsets[j] + sizes[i][j]]
                offsets[j] += sizes[i][j]
                if check_rerun and not torch.allclose(f.detach(), cached[i][j], rtol=0.0, atol=rerun_atol):
                    diff = (f.detach() - cached[i][j]).abs().max().item()
                    raise RuntimeError(
                        f"encode(micro_batches[{i}]) output {j} differs from the first pass by up to {diff:.3g} "
                        f"(> rerun_atol={rerun_atol}); the cached gradient would be applied to other features. "
                        "Keep preserve_rng=True, avoid train-mode batch-norm, or make encode deterministic."
                    )
                if f.requires_grad:
                    outputs.append(f)
                    output_grads.append(g)
            if outputs:
                torch.autograd.backward(outputs, output_grads)
    if preserve_rng:
        _set_rng_state(after_first_pass)
    return loss.detach()
