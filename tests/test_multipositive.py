"""Multi-positive contrastive loss: brute-force formula, reduction to CLIP, exactness across 2 gloo ranks.

Scaling convention (as ClipLoss, see tests/test_losses_contrastive.py): mean over ranks of the local
losses == the single-process global-batch loss; the gradient on rank r's features == W x the global
gradient for those rows; loss-only scalars (the scale): mean over ranks == global gradient.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed

from mmalign.losses.contrastive import ClipLoss
from mmalign.speech.multipositive import MultiPositiveContrastiveLoss

SCALE = 6.0
IDS = [5, 9, 5, 2, 9, 7, 5, 3]  # repeats within a rank AND across the two ranks of 4 rows


def _features(n: int, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(a + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a, b


def _run(a, b, ids, multi=True):
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(SCALE), dtype=torch.float64, requires_grad=True)
    loss = MultiPositiveContrastiveLoss(multi)(a, b, log_scale.exp(), ids)
    loss.backward()
    return {"loss": float(loss), "a": a.grad.numpy(), "b": b.grad.numpy(), "scale": float(log_scale.grad)}


def _brute(a, b, ids):
    """Per-row loops straight from the formula l_i = -1/|P(i)| sum_p log softmax_i[p], both directions."""
    total = 0.0
    for x, y in ((a, b), (b, a)):
        logits = SCALE * x @ y.T
        for i in range(len(ids)):
            logp = logits[i] - torch.logsumexp(logits[i], 0)
            pos = [j for j in range(len(ids)) if ids[j] == ids[i]]
            total += float(-sum(logp[j] for j in pos) / len(pos)) / len(ids)
    return total / 2


def test_matches_brute_force_formula():
    a, b = _features(len(IDS))
    got = MultiPositiveContrastiveLoss()(a, b, SCALE, torch.tensor(IDS))
    assert float(got) == pytest.approx(_brute(a, b, IDS), rel=1e-12)


def test_distinct_ids_equal_clip_and_repeats_differ():
    a, b = _features(6)
    distinct = torch.arange(6)
    clip = float(ClipLoss()(a, b, SCALE))
    assert float(MultiPositiveContrastiveLoss()(a, b, SCALE, distinct)) == pytest.approx(clip, rel=1e-12)
    assert float(MultiPositiveContrastiveLoss(multi_positive=False)(a, b, SCALE)) == pytest.approx(clip, rel=1e-12)
    same = torch.tensor([0, 0, 1, 1, 2, 2])
    assert float(MultiPositiveContrastiveLoss()(a, b, SCALE, same)) != pytest.approx(clip, rel=1e-6)


def test_duplicate_clips_are_not_pushed_apart():
    # Two identical pairs with one id: their gradients must be equal (no false-negative repulsion).
    a, b = _features(4)
    a[1], b[1] = a[0], b[0]
    r = _run(a, b, torch.tensor([0, 0, 1, 2]))
    np.testing.assert_allclose(r["a"][0], r["a"][1], atol=1e-12)


def test_bad_ids_give_clear_errors():
    a, b = _features(4)
    with pytest.raises(ValueError, match="needs ids"):
        MultiPositiveContrastiveLoss()(a, b, SCALE)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        MultiPositiveContrastiveLoss()(a, b, SCALE, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        MultiPositiveContrastiveLoss()(a, b, SCALE, torch.zeros(4))


def _worker(rank, world, a_np, b_np, ids):
    a, b = torch.from_numpy(a_np), torch.from_numpy(b_np)
    n = a.shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    return {"multi": _run(a[rows], b[rows], torch.tensor(ids[rows])),
            "diag": _run(a[rows], b[rows], None, multi=False)}


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2])
def test_exact_across_ranks(world):
    a, b = _features(len(IDS))
    ref = {"multi": _run(a, b, torch.tensor(IDS)), "diag": _run(a, b, None, multi=False)}
    out = run_distributed(_worker, world, (a.numpy(), b.numpy(), IDS))
    n = len(IDS) // world
    for kind in ("multi", "diag"):
        assert np.mean([o[kind]["loss"] for o in out]) == pytest.approx(ref[kind]["loss"], rel=1e-12)
        assert np.mean([o[kind]["scale"] for o in out]) == pytest.approx(ref[kind]["scale"], rel=1e-10)
        for r, o in enumerate(out):
            for side in ("a", "b"):
                np.testing.assert_allclose(o[kind][side], world * ref[kind][side][r * n:(r + 1) * n],
                                           rtol=1e-10, atol=1e-12)
