"""Best-monotonic-alignment consistency between speech frames and text tokens.

A speech sequence ``x (T, D)`` and a text sequence ``y (U, D)`` have different lengths and no known
alignment. These losses compare them along their *best* monotonic alignment: the path through the
``(T, U)`` cost matrix ``C[i, j] = cost(x_i, y_j)`` from ``(0, 0)`` to ``(T-1, U-1)`` with steps
``(1, 0)``, ``(0, 1)``, ``(1, 1)``.

* ``dtw``: hard DTW, ``R[i, j] = C[i, j] + min(R[i-1, j], R[i, j-1], R[i-1, j-1])``. The value is
  recomputed as the sum of ``C`` over the optimal path so gradients reach exactly those entries.
* ``soft_dtw``: Cuturi & Blondel (2017), ``min`` replaced by
  ``softmin_g(a) = -g * log(sum(exp(-a / g)))``; smooth in ``C``, tends to DTW as ``g -> 0`` and is
  below it by at most ``g * log(#paths)``.
* ``soft_dtw_divergence``: Blondel, Mensch & Vert (2021),
  ``D(x, y) = sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2``, which is 0 for ``x == y`` (soft-DTW
  itself is not: ``sdtw(x, x) < 0``) and non-negative for the squared-Euclidean cost.

The dynamic programme runs over anti-diagonals ``d = i + j`` (a wavefront): every cell of one
diagonal depends only on the two previous diagonals, so each step is one vectorised op over the
batch and the diagonal (T + U steps, no loop over cells). Diagonal ``d`` is stored as a vector
indexed by the row ``i`` (``j = d - i``), which turns the three predecessors into shifts.

Batches are padded: ``x (B, T, D)``, ``y (B, U, D)`` with ``(B,)`` lengths (or ``(B, T)`` bool
masks with a valid prefix). Cells past a sample's lengths never feed ``R[T_b, U_b]`` (the DP only
looks back), so the padded matrix is run as a whole and ``R[T_b, U_b]`` is read per sample.

Alone, any of these admits collapse (map every frame and token to one point: cost 0). Train it
beside CTC or a contrastive loss, which keep the representations discriminative.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Cost = Literal["cosine", "sqeuclidean"]

# Finite stand-in for +inf outside the DP's valid region: with a real inf, softmin over three
# unreachable cells is (-inf) - (-inf) = NaN, and the NaN leaks into gradients through torch.where.
_BIG = 1e10


def _as_lengths(lengths: Tensor | None, batch: int, size: int, name: str, device: torch.device) -> Tensor:
    """Normalise ``None`` / ``(B,)`` lengths / ``(B, size)`` bool mask to validated ``(B,)`` int64."""
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.long, device=device)
    if lengths.dim() == 2:
        if lengths.shape != (batch, size):
            raise ValueError(f"{name} mask must be (B, {size})=({batch}, {size}), got {tuple(lengths.shape)}")
        lengths = lengths.bool().sum(1)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must be (B,)=({batch},) lengths or a (B, L) mask, got {tuple(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.long)
    if int(lengths.min()) < 1 or int(lengths.max()) > size:
        raise ValueError(f"{name} must be in [1, {size}] (no empty sequences), got {lengths.tolist()}")
    return lengths


def pairwise_cost(x: Tensor, y: Tensor, cost: Cost = "cosine") -> Tensor:
    """``x (B, T, D)``, ``y (B, U, D)`` -> ``C (B, T, U)``.

    ``cosine``: ``1 - cos(x_i, y_j)`` in [0, 2], scale-free (good for unnormalised encoder outputs).
    ``sqeuclidean``: ``|x_i - y_j|^2`` via ``|x|^2 + |y|^2 - 2 x.y`` (no (B, T, U, D) intermediate),
    clamped at 0 against rounding.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"expected x (B, T, D) and y (B, U, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if cost == "cosine":
        return 1.0 - F.normalize(x, dim=-1, eps=1e-8) @ F.normalize(y, dim=-1, eps=1e-8).transpose(1, 2)
    if cost == "sqeuclidean":
        sq = x.square().sum(-1)[:, :, None] + y.square().sum(-1)[:, None, :] - 2.0 * x @ y.transpose(1, 2)
        return sq.clamp(min=0.0)
    raise ValueError(f"cost must be 'cosine' or 'sqeuclidean', got {cost!r}")


def _skew(C: Tensor) -> Tensor:
    """``C (B, T, U)`` -> ``S (B, T + U - 1, T)`` with ``S[b, k, i] = C[b, i, k - i]`` (0 if out of range).

    Row ``k`` is the cost on anti-diagonal ``i + j = k``; one gather, done once, keeps the loop cheap.
    """
    B, T, U = C.shape
    k = torch.arange(T + U - 1, device=C.device)[:, None]
    i = torch.arange(T, device=C.device)[None, :]
    j = k - i  # (K, T)
    valid = (j >= 0) & (j < U)
    flat = C.reshape(B, T * U).gather(1, (i * U + j.clamp(0, U - 1)).reshape(1, -1).expand(B, -1))
    return torch.where(valid, flat.reshape(B, T + U - 1, T), torch.zeros((), dtype=C.dtype, device=C.device))


def _wavefront(C: Tensor, gamma: float | None) -> tuple[Tensor, Tensor | None]:
    """Run the (soft-)DTW recursion on ``C (B, T, U)``.

    Returns ``diags (B, T + U + 1, T + 1)`` with ``diags[b, d, i] = R[i, d - i]`` (``R`` 1-indexed,
    ``R[0, 0] = 0``, other borders ``_BIG``) and, for hard DTW (``gamma=None``), the argmin choice
    per cell: 0 = diagonal ``(i-1, j-1)``, 1 = up ``(i-1, j)``, 2 = left ``(i, j-1)``.
    """
    B, T, U = C.shape
    S = _skew(C)
    rows = torch.arange(T + 1, device=C.device)
    big = C.new_full((B, 1), _BIG)
    r_prev2 = torch.cat([C.new_zeros(B, 1), C.new_full((B, T), _BIG)], 1)  # d = 0: only R[0, 0]
    r_prev1 = C.new_full((B, T + 1), _BIG)  # d = 1: R[0, 1], R[1, 0] are borders
    diags, choices = [r_prev2, r_prev1], []
    for d in range(2, T + U + 1):
        # Predecessors of cell (i, d - i) for i = 1..T, as shifts of the previous diagonals.
        cand = torch.stack([r_prev2[:, :-1], r_prev1[:, :-1], r_prev1[:, 1:]], dim=-1)  # (B, T, 3)
        if gamma is None:
            choice = cand.argmin(-1)  # first minimum on ties: prefers the diagonal step
            best = cand.gather(-1, choice[..., None]).squeeze(-1)
            choices.append(torch.cat([choice.new_zeros(B, 1), choice], 1))
        else:
            best = -gamma * torch.logsumexp(-cand / gamma, dim=-1)
        j = d - rows[1:]
        valid = (j >= 1) & (j <= U)  # cells of this diagonal inside the (padded) matrix
        r = torch.where(valid, S[:, d - 2] + best, big)
        r = torch.cat([big, r], 1)  # i = 0 column: R[0, d] is a border
        diags.append(r)
        r_prev2, r_prev1 = r_prev1, r
    stacked_choices = None
    if gamma is None:
        pad = torch.zeros(B, 2, T + 1, dtype=torch.long, device=C.device)
        stacked_choices = torch.cat([pad, torch.stack(choices, 1)], 1)
    return torch.stack(diags, 1), stacked_choices


def _check_cost(C: Tensor) -> Tensor:
    if C.dim() != 3:
        raise ValueError(f"cost matrix must be (B, T, U), got shape {tuple(C.shape)}")
    # Low-precision floats overflow at _BIG and lose the small soft-min gaps: run the DP in fp32.
    return C.float() if C.dtype in (torch.float16, torch.bfloat16) else C


def dtw_from_cost(
    C: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    normalize: bool = False,
    return_path: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Hard DTW value per sample, ``(B,)``, optionally with the path as a ``(B, T, U)`` bool mask.

    The value is ``sum(C * path)``: differentiable w.r.t. the cost entries on the optimal path
    (the path itself is piecewise constant). ``normalize`` divides by ``T_b + U_b``, an upper bound
    on the path length, so the scale does not grow with the sequence lengths.
    """
    C = _check_cost(C)
    B, T, U = C.shape
    tl = _as_lengths(x_lengths, B, T, "x_lengths", C.device)
    ul = _as_lengths(y_lengths, B, U, "y_lengths", C.device)
    with torch.no_grad():
        _, choices = _wavefront(C.detach(), None)
    path = torch.zeros(B, T, U, dtype=torch.bool, device=C.device)
    b = torch.arange(B, device=C.device)
    i, j = tl.clone(), ul.clone()
    # Backtrack from (T_b, U_b) to (1, 1), all samples at once; at most T + U - 1 steps.
    for _ in range(T + U - 1):
        active = (i > 0) & (j > 0)
        if not bool(active.any()):
            break
        ia, ja, ba = i[active], j[active], b[active]
        path[ba, ia - 1, ja - 1] = True
        ch = choices[ba, ia + ja, ia]
        i[active] = ia - (ch != 2).long()
        j[active] = ja - (ch != 1).long()
    value = (C * path).sum((1, 2))
    if normalize:
        value = value / (tl + ul).to(value.dtype)
    return (value, path) if return_path else value


def soft_dtw_from_cost(
    C: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    gamma: float = 0.1,
    normalize: bool = False,
) -> Tensor:
    """Soft-DTW value ``R_gamma[T_b, U_b]`` per sample, ``(B,)``; differentiable in ``C`` everywhere."""
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0 (use dtw for gamma = 0), got {gamma}")
    C = _check_cost(C)
    B, T, U = C.shape
    tl = _as_lengths(x_lengths, B, T, "x_lengths", C.device)
    ul = _as_lengths(y_lengths, B, U, "y_lengths", C.device)
    diags, _ = _wavefront(C, float(gamma))
    value = diags[torch.arange(B, device=C.device), tl + ul, tl]
    if normalize:
        value = value / (tl + ul).to(value.dtype)
    return value


def _mask_padding(C: Tensor, tl: Tensor, ul: Tensor) -> Tensor:
    """Zero the padded cells so NaN/inf in padded features cannot reach the DP."""
    valid = (torch.arange(C.shape[1], device=C.device)[None, :, None] < tl[:, None, None]) & (
        torch.arange(C.shape[2], device=C.device)[None, None, :] < ul[:, None, None]
    )
    return torch.where(valid, C, torch.zeros((), dtype=C.dtype, device=C.device))


def _masked_cost(x: Tensor, y: Tensor, x_lengths: Tensor | None, y_lengths: Tensor | None,
                 cost: Cost) -> tuple[Tensor, Tensor, Tensor]:
    """Pairwise cost ``(B, T, U)`` with padding masked, plus the valid lengths of x and y."""
    C = pairwise_cost(x, y, cost)
    tl = _as_lengths(x_lengths, x.shape[0], x.shape[1], "x_lengths", x.device)
    ul = _as_lengths(y_lengths, y.shape[0], y.shape[1], "y_lengths", y.device)
    return _mask_padding(C, tl, ul), tl, ul


def dtw(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    cost: Cost = "cosine",
    normalize: bool = False,
    return_path: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Hard DTW between ``x (B, T, D)`` and ``y (B, U, D)``; see ``dtw_from_cost``."""
    C, tl, ul = _masked_cost(x, y, x_lengths, y_lengths, cost)
    return dtw_from_cost(C, tl, ul, normalize, return_path)


def soft_dtw(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    gamma: float = 0.1,
    cost: Cost = "cosine",
    normalize: bool = False,
) -> Tensor:
    """Soft-DTW between ``x (B, T, D)`` and ``y (B, U, D)``, ``(B,)``; see ``soft_dtw_from_cost``."""
    C, tl, ul = _masked_cost(x, y, x_lengths, y_lengths, cost)
    return soft_dtw_from_cost(C, tl, ul, gamma, normalize)


def soft_dtw_divergence(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    gamma: float = 0.1,
    cost: Cost = "cosine",
    normalize: bool = False,
) -> Tensor:
    """``sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2`` per sample, ``(B,)``.

    ``normalize`` divides the whole divergence by ``T_b + U_b`` (not each term by its own length),
    which keeps ``D(x, x) = 0`` and the sign of the divergence.
    """
    xy = soft_dtw(x, y, x_lengths, y_lengths, gamma, cost)
    xx = soft_dtw(x, x, x_lengths, x_lengths, gamma, cost)
    yy = soft_dtw(y, y, y_lengths, y_lengths, gamma, cost)
    value = xy - 0.5 * (xx + yy)
    if normalize:
        tl = _as_lengths(x_lengths, x.shape[0], x.shape[1], "x_lengths", x.device)
        ul = _as_lengths(y_lengths, y.shape[0], y.shape[1], "y_lengths", y.device)
        value = value / (tl + ul).to(value.dtype)
    return value


class AlignmentConsistencyLoss(nn.Module):
    """Mean best-alignment distance between speech frames and text tokens of the same utterance.

    Must be combined with CTC or a contrastive loss: on its own the encoders can collapse to a
    constant output, which has zero alignment cost.

    Args:
        mode: ``"dtw"`` (hard DTW, sub-gradient through the optimal path) or ``"soft_dtw"``.
        gamma: soft-min temperature for ``"soft_dtw"``, in cost units; smaller is closer to DTW but
            less smooth. Ignored for ``"dtw"``.
        cost: ``"cosine"`` (``1 - cos``) or ``"sqeuclidean"``.
        normalize: divide each sample's value by ``T_b + U_b`` so the scale is length-independent.
        divergence: for ``"soft_dtw"``, use the soft-DTW divergence (0 at ``x == y``) instead of the
            raw value (negative and biased toward shorter paths).
    """

    def __init__(
        self,
        mode: Literal["dtw", "soft_dtw"] = "soft_dtw",
        gamma: float = 0.1,
        cost: Cost = "cosine",
        normalize: bool = True,
        divergence: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("dtw", "soft_dtw"):
            raise ValueError(f"mode must be 'dtw' or 'soft_dtw', got {mode!r}")
        if cost not in ("cosine", "sqeuclidean"):
            raise ValueError(f"cost must be 'cosine' or 'sqeuclidean', got {cost!r}")
        if mode == "soft_dtw" and not gamma > 0:
            raise ValueError(f"gamma must be > 0 for soft_dtw, got {gamma}")
        self.mode, self.gamma, self.cost = mode, float(gamma), cost
        self.normalize, self.divergence = normalize, divergence

    def forward(
        self,
        speech: Tensor,
        text: Tensor,
        speech_lengths: Tensor | None = None,
        text_lengths: Tensor | None = None,
    ) -> Tensor:
        """``speech (B, T, D)``, ``text (B, U, D)``, lengths ``(B,)`` or ``(B, L)`` masks -> scalar."""
        if self.mode == "dtw":
            per = dtw(speech, text, speech_lengths, text_lengths, self.cost, self.normalize)
        elif self.divergence:
            per = soft_dtw_divergence(speech, text, speech_lengths, text_lengths, self.gamma, self.cost, self.normalize)
        else:
            per = soft_dtw(speech, text, speech_lengths, text_lengths, self.gamma, self.cost, self.normalize)
        return per.mean()

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, gamma={self.gamma}, cost={self.cost}, "
                f"normalize={self.normalize}, divergence={self.divergence}")
