"""REPA's mechanism claim, measured: what the hidden states at the aligned block know, and how close they are
to the teacher; and how much spatial structure a teacher candidate has before a long run.

* ``hidden_features``: mean-pooled hidden states of a backbone module for clean images noised to ``t``
  (fixed noise), with the **null class**: a class-conditional backbone would otherwise hand the probe the
  label through its conditioning, and the probe must read what the network sees in the image.
* ``probe_report``: per ``t``, linear-probe accuracy of those features for each label (shape, colour:
  train split -> val split) and CKNNA to the teacher's pooled tokens (val split), as the REPA paper
  reports them for aligned and unaligned SiTs.
* ``score_teacher``: iREPA's spatial-structure scores (LDS, CDS) of a teacher's patch tokens on the
  alignment grid, beside the linear-probe accuracy of its pooled tokens (the "global" information that
  iREPA found to predict generation quality much worse).

Plain torch: models are passed in, nothing is trained but the probes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmalign.evaluation.representation import cknna, linear_probe_accuracy, spatial_structure

from .projector import as_tokens


@torch.no_grad()
def hidden_features(backbone: nn.Module, module: nn.Module, images: Tensor, t: float, null_label: int,
                    batch_size: int = 200, seed: int = 0) -> Tensor:
    """``(N, C)``: ``module``'s output for ``x_t = (1 - t) x + t eps`` (eps fixed by ``seed``), mean over tokens."""
    out: list[Tensor] = []

    def hook(m, i, o):
        tokens, _ = as_tokens(o[0] if isinstance(o, tuple) else o)
        out.append(tokens.float().mean(1).cpu())

    handle = module.register_forward_hook(hook)
    g = torch.Generator().manual_seed(seed)
    device = next(backbone.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            x = images[start: start + batch_size].to(device)
            noise = torch.randn(x.shape, generator=g).to(device)
            tt = torch.full((len(x),), float(t), device=device)
            backbone((1 - t) * x + t * noise, tt, torch.full((len(x),), null_label, device=device, dtype=torch.long))
    finally:
        handle.remove()
    return torch.cat(out)


@torch.no_grad()
def teacher_pooled(teacher, images: Tensor, batch_size: int = 200) -> Tensor:
    """Mean-pooled teacher tokens of images in ``[-1, 1]``."""
    device = next(teacher.parameters()).device
    return torch.cat([teacher.encode(images[s: s + batch_size].to(device)).mean(1).cpu()
                      for s in range(0, len(images), batch_size)])


def probe_report(backbone: nn.Module, module: nn.Module, null_label: int, train: tuple[Tensor, dict[str, Tensor]],
                 val: tuple[Tensor, dict[str, Tensor]], ts: Sequence[float] = (0.25, 0.5, 0.75),
                 teacher_val: Tensor | None = None, k: int = 10) -> dict[str, dict[str, float]]:
    """``{"t=0.5": {"probe_shape": acc, "probe_colour": acc, "cknna": value}, ...}``.

    Args:
        train, val: ``(images in [-1, 1], {label name: labels})``.
        teacher_val: The teacher's pooled features of the val images (CKNNA); None = no CKNNA.
    """
    out: dict[str, dict[str, float]] = {}
    was_training = backbone.training
    backbone.eval()
    try:
        for t in ts:
            ftr = hidden_features(backbone, module, train[0], t, null_label)
            fva = hidden_features(backbone, module, val[0], t, null_label)
            row = {f"probe_{name}": linear_probe_accuracy(ftr, labels, fva, val[1][name])
                   for name, labels in train[1].items()}
            if teacher_val is not None:
                row["cknna"] = cknna(fva, teacher_val, k)
            out[f"t={t:g}"] = row
    finally:
        backbone.train(was_training)
    return out


@torch.no_grad()
def score_teacher(teacher, train: tuple[Tensor, dict[str, Tensor]], val: tuple[Tensor, dict[str, Tensor]],
                  grid: int | None = None, batch_size: int = 200) -> dict[str, float]:
    """Spatial structure (LDS, CDS) of ``teacher``'s tokens on ``grid`` (its input resized to give that grid,
    as alignment uses it) for the val images, and linear-probe accuracy of its pooled tokens."""
    if grid is not None:
        teacher.set_grid(grid)
    device = next(teacher.parameters()).device
    tokens = torch.cat([teacher.encode(val[0][s: s + batch_size].to(device)).cpu()
                        for s in range(0, len(val[0]), batch_size)])
    row = spatial_structure(tokens)
    ptr, pva = teacher_pooled(teacher, train[0], batch_size), tokens.mean(1)
    row.update({f"probe_{name}": linear_probe_accuracy(ptr, labels, pva, val[1][name])
                for name, labels in train[1].items()})
    row["grid"], row["dim"] = int(tokens.shape[1] ** 0.5), int(tokens.shape[-1])
    return row
