"""How much a representation knows and how it relates to another: linear probes, CKNNA, spatial structure.

Plain torch, no Lightning. Used by the REPA benchmark (REPA's mechanism claim: aligned hidden states
are more linearly separable and closer to the teacher) and to score teacher candidates before a run.

* ``linear_probe_accuracy``: multinomial logistic regression on frozen features (standardised with
  the training statistics, L2-penalised, full-batch L-BFGS from zero: deterministic), scored on
  held-out features.
* ``cknna``: Centered Kernel Nearest-Neighbour Alignment (Huh et al. 2024, "The Platonic
  Representation Hypothesis"; REPA uses it with k = 10): CKA between the two linear kernels with each
  restricted to the pairs that are mutual k-nearest neighbours in *both* spaces, unbiased HSIC.
* ``spatial_structure``: iREPA's measures of the spatial structure of patch tokens. LDS
  (local-vs-distant similarity): mean cosine of 4-neighbour token pairs minus the mean cosine of
  pairs at Manhattan distance >= ``far``; CDS (correlation-decay slope): minus the slope of the mean
  cosine against Manhattan distance 1..``dmax``. iREPA uses far 6 and dmax 8 on 16x16 grids; the
  defaults here scale them with the grid side (far = 3/8 of it, dmax = 1/2), so an 8x8 teacher is
  measured at the same relative distances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, l2: float = 1e-3,
                          max_iter: int = 200) -> float:
    """Accuracy on ``(test_x, test_y)`` of a linear softmax classifier fit on ``(train_x, train_y)``.

    ``l2`` is the penalty on the weights (per sample, features standardised), so its meaning does not
    change with the sample count or the feature scale."""
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"probe features must be (N, D) with the same D, got {tuple(train_x.shape)} and "
                         f"{tuple(test_x.shape)}.")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("probe features and labels differ in length.")
    x, xt = train_x.double(), test_x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)
    y = train_y.long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b).argmax(1) == test_y.long()).double().mean())


def _hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:
    # Song et al. 2012, eq. 5: diagonals zeroed, needs m > 3
    m = k.shape[0]
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    value = (k * l.T).sum() + k.sum() * l.sum() / ((m - 1) * (m - 2)) - 2 * (k @ l).sum() / (m - 2)
    return value / (m * (m - 3))


def cknna(a: Tensor, b: Tensor, k: int = 10) -> float:
    """CKNNA between features ``a`` (N, Da) and ``b`` (N, Db) of the same N samples (L2-normalised
    here); 1 for identical neighbourhoods and kernels, about 0 for unrelated ones."""
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"cknna needs the same samples on both sides, got {n} and {b.shape[0]}.")
    if not 2 <= k < n - 1 or n < 5:
        raise ValueError(f"cknna needs 2 <= k < N - 1 and N >= 5, got k={k}, N={n}.")
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    ka, kb = a @ a.T, b @ b.T

    def knn_mask(kern: Tensor) -> Tensor:
        idx = kern.clone().fill_diagonal_(float("-inf")).topk(k, dim=1).indices
        return torch.zeros_like(kern).scatter_(1, idx, 1.0)

    ma, mb = knn_mask(ka), knn_mask(kb)

    def sim(k1: Tensor, m1: Tensor, k2: Tensor, m2: Tensor) -> Tensor:
        mask = m1 * m2
        return _hsic_unbiased(mask * k1, mask * k2)

    ab, aa, bb = sim(ka, ma, kb, mb), sim(ka, ma, ka, ma), sim(kb, mb, kb, mb)
    return float(ab / (torch.sqrt(aa * bb) + 1e-12))


def _grid_distances(side: int, device) -> Tensor:
    yy, xx = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    c = torch.stack([yy.flatten(), xx.flatten()], 1)
    return (c[:, None] - c[None]).abs().sum(-1)  # Manhattan, (N, N)


def spatial_structure(tokens: Tensor, far: int | None = None, dmax: int | None = None) -> dict[str, float]:
    """``{"lds": ..., "cds": ...}`` of patch tokens ``(B, G*G, D)`` (row-major square grid), averaged
    over images. Higher = tokens of nearby patches are more alike than those of distant ones."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, N, D), got {tuple(tokens.shape)}.")
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1] or side < 3:
        raise ValueError(f"tokens must lie on a square grid of side >= 3, got {tokens.shape[1]} tokens.")
    far = far or max(2, round(side * 6 / 16))
    dmax = dmax or max(2, round(side * 8 / 16))
    u = F.normalize(tokens.float(), dim=-1)
    gram = u @ u.transpose(1, 2)  # (B, N, N) cosines
    dist = _grid_distances(side, u.device)
    local = gram[:, dist == 1].mean(1)
    far_mask = dist >= far
    if not far_mask.any():
        raise ValueError(f"no token pairs at distance >= {far} on a {side}x{side} grid; lower far.")
    lds = local - gram[:, far_mask].mean(1)
    ds = [d for d in range(1, dmax + 1) if (dist == d).any()]
    curve = torch.stack([gram[:, dist == d].mean(1) for d in ds], 1)  # (B, K)
    x = torch.tensor(ds, dtype=curve.dtype, device=u.device)
    x0 = x - x.mean()
    slope = ((curve - curve.mean(1, keepdim=True)) @ x0) / (x0 @ x0)
    return {"lds": float(lds.mean()), "cds": float((-slope).mean())}
