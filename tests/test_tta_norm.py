"""Source-prior normalisation: BatchNorm on ``N/(N+n)`` source + ``n/(N+n)`` test-batch statistics."""

import math

import pytest
import torch
from torch import nn

from mmalign.tta.methods import Norm, Tent
from mmalign.tta.source import SplitClassifier
from mmalign.tta.specs import NormSpec

from _tta import conf, entropy, hand_bn1d, tiny_cnn


def _hand_cnn(model, x, prior):
    conv, bn = model.backbone[0], model.backbone[1]
    h = conv(x).detach()
    n = x.shape[0]
    w = 1.0 if math.isinf(prior) else prior / (prior + n)
    mu = w * bn.running_mean + (1 - w) * h.mean((0, 2, 3))
    var = w * bn.running_var + (1 - w) * h.var((0, 2, 3), unbiased=False)
    z = (h - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    z = z * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return model.head(z.relu().mean((2, 3))).detach()


@pytest.mark.parametrize("prior", [0.0, 6.0, 200.0, math.inf])
def test_norm_mixes_source_and_batch_statistics(prior):
    model = tiny_cnn()
    x = torch.randn(6, 3, 5, 5) * 2 + 1
    torch.testing.assert_close(Norm(model, conf(prior=prior))(x), _hand_cnn(model, x, prior), rtol=1e-5, atol=1e-5)
    if math.isinf(prior):  # all source: the plain model in eval mode
        torch.testing.assert_close(Norm(model, conf(prior=prior))(x), model(x), rtol=1e-5, atol=1e-5)


def test_prior_weight_and_validation():
    assert NormSpec(prior=16).weight(16) == 0.5 and NormSpec(prior=0).weight(200) == 0.0
    assert NormSpec(prior=math.inf).weight(5) == 1.0
    with pytest.raises(ValueError, match="norm.prior must be >= 0, got -1"):
        NormSpec(prior=-1)
    with pytest.raises(ValueError, match=r"norm.momentum must be in \[0, 1\), got 1.5"):
        NormSpec(momentum=1.5)


def test_tent_gradient_flows_through_mixed_statistics_of_later_layers():
    """Two BatchNorms: the first layer's gamma reaches the loss through the second layer's batch
    statistics as well; the step equals autograd on the written-out forward."""
    torch.manual_seed(0)
    bn1, lin, bn2, head = nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)
    with torch.no_grad():
        for bn in (bn1, bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
    model = SplitClassifier(nn.Sequential(bn1, lin, bn2), head).eval()
    prior, lr = 8.0, 0.1
    tent = Tent(model, conf(lr=lr, prior=prior, optimizer="sgd", sgd_momentum=0.0))
    x = torch.randn(5, 4) * 1.5
    params = [bn1.weight, bn1.bias, bn2.weight, bn2.bias]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    z = hand_bn1d(x, leaves[0], leaves[1], bn1.running_mean, bn1.running_var, prior)
    logits = head(hand_bn1d(lin(z), leaves[2], leaves[3], bn2.running_mean, bn2.running_var, prior))
    grads = torch.autograd.grad(entropy(logits).mean(), leaves)
    torch.testing.assert_close(tent(x), logits.detach(), rtol=1e-5, atol=1e-6)
    got = [tent.model.backbone[0].weight, tent.model.backbone[0].bias, tent.model.backbone[2].weight,
           tent.model.backbone[2].bias]
    for g, leaf, grad in zip(got, leaves, grads):
        torch.testing.assert_close(g.detach(), (leaf - lr * grad).detach(), rtol=1e-5, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_momentum_moves_the_reference_and_reset_restores_it():
    model = tiny_cnn()
    m = 0.25
    norm = Norm(model, conf(prior=10.0, momentum=m))
    x = torch.randn(6, 3, 5, 5) + 2
    norm(x)
    h = model.backbone[0](x).detach()
    bn = model.backbone[1]
    mean, var = norm.norm.ref["backbone.1"]
    torch.testing.assert_close(mean, (1 - m) * bn.running_mean + m * h.mean((0, 2, 3)))
    torch.testing.assert_close(var, (1 - m) * bn.running_var + m * h.var((0, 2, 3), unbiased=True))
    # the exported weights carry that running reference, eps restored: a plain copy reproduces prior .inf
    sd = norm.adapted_state_dict()
    torch.testing.assert_close(sd["backbone.1.running_mean"], mean)
    plain = tiny_cnn()
    plain.load_state_dict(sd)
    assert plain.backbone[1].eps == bn.eps
    norm_inf = Norm(plain, conf(prior=math.inf))
    torch.testing.assert_close(norm_inf(x), plain(x), rtol=1e-5, atol=1e-6)
    norm.reset()
    torch.testing.assert_close(norm.norm.ref["backbone.1"][0], bn.running_mean)


def test_fused_batchnorm_activation_of_timm():
    """timm's BatchNormAct2d applies its activation after normalising: it must survive."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    bn = BatchNormAct2d(4, act_layer=nn.ReLU)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    model = SplitClassifier(nn.Sequential(bn, nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4, 2, 2)
    w = 5 / 8
    mu = w * bn.running_mean + (1 - w) * x.mean((0, 2, 3))
    var = w * bn.running_var + (1 - w) * x.var((0, 2, 3), unbiased=False)
    z = ((x - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)) * bn.weight[None, :, None, None]
    z = (z + bn.bias[None, :, None, None]).relu()
    torch.testing.assert_close(Norm(model, conf(prior=5.0))(x), model.head(z.mean((2, 3))).detach(),
                               rtol=1e-5, atol=1e-6)
