import math

import pytest
import torch

from mmalign.speech.consistency import (
    AlignmentConsistencyLoss,
    dtw,
    dtw_from_cost,
    pairwise_cost,
    soft_dtw,
    soft_dtw_divergence,
    soft_dtw_from_cost,
)


def _paths(T, U):
    """All monotonic paths from (0, 0) to (T-1, U-1) with steps (1,0), (0,1), (1,1)."""
    if T == 1 and U == 1:
        return [[(0, 0)]]
    out = []
    for di, dj in ((1, 0), (0, 1), (1, 1)):
        if T - di >= 1 and U - dj >= 1:
            out += [p + [(T - 1, U - 1)] for p in _paths(T - di, U - dj)]
    return out


def _brute_dtw(C):
    best = min(_paths(*C.shape), key=lambda p: sum(float(C[i, j]) for i, j in p))
    return sum(float(C[i, j]) for i, j in best), best


def _brute_soft_dtw(C, gamma):
    costs = torch.tensor([sum(float(C[i, j]) for i, j in p) for p in _paths(*C.shape)], dtype=torch.float64)
    return float(-gamma * torch.logsumexp(-costs / gamma, 0))


@pytest.mark.parametrize("T,U", [(1, 1), (1, 4), (4, 1), (2, 3), (3, 3), (4, 4), (4, 2)])
def test_dtw_equals_brute_force(T, U):
    g = torch.Generator().manual_seed(T * 10 + U)
    C = torch.rand(1, T, U, generator=g, dtype=torch.float64)
    value, path = dtw_from_cost(C, return_path=True)
    ref, ref_path = _brute_dtw(C[0])
    assert value.item() == pytest.approx(ref, abs=1e-12)
    assert path[0].sum().item() >= max(T, U)
    assert float((C[0] * path[0]).sum()) == pytest.approx(ref, abs=1e-12)
    # The path is a valid monotonic path ending in the corner.
    assert path[0, 0, 0] and path[0, -1, -1]


def test_soft_dtw_equals_brute_force_logsumexp():
    C = torch.rand(1, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for gamma in (0.05, 1.0):
        got = soft_dtw_from_cost(C, gamma=gamma).item()
        # The DP logsumexp over paths is exact only through the recursion; check it against the
        # closed form over all paths (they coincide because softmin composes additively).
        assert got == pytest.approx(_brute_soft_dtw(C[0], gamma), abs=1e-9)


def test_batched_variable_lengths_equal_per_sample():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    tl, ul = torch.tensor([7, 3, 5]), torch.tensor([2, 4, 1])
    x_pad, y_pad = x.clone(), y.clone()
    for b in range(3):  # garbage in the padding must not matter
        x_pad[b, tl[b]:] = 1e3
        y_pad[b, ul[b]:] = float("nan")
    for cost in ("cosine", "sqeuclidean"):
        hard = dtw(x_pad, y_pad, tl, ul, cost=cost)
        soft = soft_dtw(x_pad, y_pad, tl, ul, gamma=0.3, cost=cost)
        div = soft_dtw_divergence(x_pad, y_pad, tl, ul, gamma=0.3, cost=cost, normalize=True)
        for b in range(3):
            xb, yb = x[b : b + 1, : tl[b]], y[b : b + 1, : ul[b]]
            assert hard[b].item() == pytest.approx(dtw(xb, yb, cost=cost).item(), abs=1e-10)
            C = pairwise_cost(xb, yb, cost)[0]
            assert hard[b].item() == pytest.approx(_brute_dtw(C)[0], abs=1e-10)
            assert soft[b].item() == pytest.approx(soft_dtw(xb, yb, gamma=0.3, cost=cost).item(), abs=1e-10)
            ref_div = soft_dtw_divergence(xb, yb, gamma=0.3, cost=cost).item() / (tl[b] + ul[b]).item()
            assert div[b].item() == pytest.approx(ref_div, abs=1e-10)
    # Masks are accepted in place of lengths.
    tmask = torch.arange(7)[None] < tl[:, None]
    umask = torch.arange(4)[None] < ul[:, None]
    assert torch.allclose(dtw(x_pad, y_pad, tmask, umask), dtw(x_pad, y_pad, tl, ul))


def test_soft_dtw_tends_to_dtw():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 6, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    hard = dtw(x, y, cost="sqeuclidean")
    soft = soft_dtw(x, y, gamma=1e-3, cost="sqeuclidean")
    n_paths = len(_paths(6, 5))
    # softmin <= min, and min - softmin <= gamma * log(#paths).
    assert torch.all(soft <= hard + 1e-4)
    assert torch.all(hard - soft <= 1e-3 * math.log(n_paths) + 1e-4)
    assert torch.all(soft_dtw(x, y, gamma=1.0, cost="sqeuclidean") < hard - 0.1)


def test_soft_dtw_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    tl, ul = torch.tensor([3, 2]), torch.tensor([4, 3])
    for cost in ("sqeuclidean", "cosine"):
        assert torch.autograd.gradcheck(lambda a, b: soft_dtw(a, b, tl, ul, gamma=0.5, cost=cost), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: soft_dtw_divergence(a, b, tl, ul, gamma=0.5, normalize=True), (x, y))


def test_dtw_gradient_only_on_path():
    C = torch.rand(1, 4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    value, path = dtw_from_cost(C, return_path=True)
    value.sum().backward()
    assert torch.equal(C.grad, path.to(C.dtype))


def test_divergence_zero_on_self_and_positive_otherwise():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    for cost in ("sqeuclidean", "cosine"):
        self_div = soft_dtw_divergence(x, x, gamma=0.1, cost=cost)
        assert torch.allclose(self_div, torch.zeros(2, dtype=torch.float64), atol=1e-9)
    assert torch.all(soft_dtw_divergence(x, y, gamma=0.1, cost="sqeuclidean") > 0)
    assert torch.all(soft_dtw(x, x, gamma=1.0, cost="sqeuclidean") < -1e-3)  # why the divergence exists


def test_loss_module_normalize_and_validation():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    y = torch.randn(2, 3, 4, generator=g)
    tl, ul = torch.tensor([6, 4]), torch.tensor([3, 2])
    for mode in ("dtw", "soft_dtw"):
        loss = AlignmentConsistencyLoss(mode=mode, gamma=0.1, cost="cosine", normalize=True)(x, y, tl, ul)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad[1, 4:].abs().sum() == 0  # padding gets no gradient
        x.grad = None
    # Normalisation divides by T + U.
    x1, y1 = torch.randn(1, 5, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    base = AlignmentConsistencyLoss("dtw", normalize=True)(x1, y1)
    assert AlignmentConsistencyLoss("dtw", normalize=False)(x1, y1).item() == pytest.approx(base.item() * 8, rel=1e-5)
    with pytest.raises(ValueError, match="mode"):
        AlignmentConsistencyLoss(mode="ctc")
    with pytest.raises(ValueError, match="gamma"):
        AlignmentConsistencyLoss(mode="soft_dtw", gamma=0.0)
    with pytest.raises(ValueError, match="cost"):
        AlignmentConsistencyLoss(cost="l1")
    with pytest.raises(ValueError, match="x_lengths"):
        dtw(x, y, torch.tensor([0, 3]), ul)
