"""TentFilter with its REAL frozen original model (no stand-in): the filter's decisions, step after
step, equal a hand computation from the source weights, and the original never moves.

Kept apart from tests/test_tta.py so the TTA helpers' edits there do not collide with it."""

import copy

import torch
from torch import nn

from mmalign.tta.methods import TentFilter
from mmalign.tta.source import SplitClassifier
from _tta import conf


def _tiny_cnn():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        backbone[1].weight.uniform_(0.5, 1.5)
        backbone[1].bias.uniform_(-0.5, 0.5)
        backbone[1].running_mean.uniform_(-1, 1)  # not used: both models normalise with the test batch
    return SplitClassifier(backbone, nn.Linear(4, 3)).eval()


def _probs_by_hand(source, gamma, beta, x):
    """softmax(head(mean_hw relu(BN_batch(conv x) * gamma + beta))): BatchNorm on the batch's own
    statistics (biased variance), the source's conv and head."""
    conv, bn, head = source.backbone[0], source.backbone[1], source.head
    h = conv(x)
    mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    z = (h - mu) / torch.sqrt(var + bn.eps) * gamma[None, :, None, None] + beta[None, :, None, None]
    return head(z.relu().mean((2, 3))).softmax(-1)


@torch.no_grad()
def _kept_by_hand(source, adapted_bn, x):
    p_orig = _probs_by_hand(source, source.backbone[1].weight, source.backbone[1].bias, x)
    p_adapt = _probs_by_hand(source, adapted_bn.weight, adapted_bn.bias, x)
    c_o = p_orig.argmax(1)
    rows = torch.arange(len(x))
    return p_adapt[rows, c_o] >= p_orig[rows, c_o]


def test_filter_runs_the_real_frozen_original():
    source = _tiny_cnn()
    snapshot = copy.deepcopy(source)
    method = TentFilter(source, conf(lr=0.2))  # prior 0: pure test-batch statistics, as computed by hand
    gen = torch.Generator().manual_seed(1)
    kept = []
    for step in range(6):
        x = torch.randn(16, 3, 5, 5, generator=gen)
        if step == 1:  # a drifted adapted model (as after a long stream), so the filter has work to do
            with torch.no_grad():  # channel 0 damped: some samples gain confidence, others lose it
                bn, src = method.model.backbone[1], snapshot.backbone[1]
                bn.weight.copy_(src.weight * torch.tensor([0.2, 1.0, 1.0, 1.0]))
                bn.bias.copy_(src.bias)
        want = _kept_by_hand(snapshot, method.model.backbone[1], x)  # the adapted state BEFORE this step
        method(x)
        assert method.last["kept"] == float(want.float().mean()), step
        kept.append(int(want.sum()))
    # step 0: adapted == original, so every sample is kept; after the drift the original rejects some
    # but not all (an original that adapted along, or a stand-in, would not give this pattern)
    assert kept[0] == 16 and any(0 < k < 16 for k in kept[1:]), kept
    assert (method.kept, method.seen) == (sum(kept), 6 * 16)
    # the original is frozen: its weights are still the source's, while the adapted BN moved
    for (name, p), p0 in zip(method.original.named_parameters(), snapshot.parameters()):
        assert not p.requires_grad and torch.equal(p, p0), name
    assert not torch.equal(method.model.backbone[1].weight, snapshot.backbone[1].weight)
