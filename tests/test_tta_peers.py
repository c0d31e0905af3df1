"""EATA and SAR against hand-computed steps (tiny BatchNorm1d + linear model, SGD, written-out maths)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.tta.eata import Eata, fisher_information
from mmalign.tta.sar import Sar
from mmalign.tta.specs import EataSpec, SarSpec

from _tta import bn_mlp, conf, entropy, hand_bn1d

C = 3


def _forward(model, x, gamma, beta):
    bn = model.backbone[0]
    return model.head(hand_bn1d(x, gamma, beta, bn.running_mean, bn.running_var, 0.0))


def _leaves(model):
    bn = model.backbone[0]
    return bn.weight.detach().clone().requires_grad_(True), bn.bias.detach().clone().requires_grad_(True)


def _params(method):
    bn = method.model.backbone[0]
    return bn.weight.detach(), bn.bias.detach()


def test_eata_two_steps_equal_hand_computation():
    """Step 1: the entropy filter alone (nothing is redundant yet) and the sample weights; step 2 adds
    the redundancy filter against the moving average of step 1's kept outputs and the Fisher term."""
    model = bn_mlp(scale=4.0)
    lr, beta_f, eps = 0.3, 50.0, 0.7
    fisher = {"backbone.0.weight": torch.tensor([0.5, 1.0, 2.0, 0.1]), "backbone.0.bias": torch.tensor([1.0, 0.2, 0.3, 0.4])}
    eata = Eata(model, conf(lr=lr, optimizer="sgd", sgd_momentum=0.0,
                            eata=EataSpec(redundancy=eps, fisher_beta=beta_f)), fisher)
    e0 = 0.4 * math.log(C)
    torch.manual_seed(5)
    x1, x2 = torch.randn(16, 4), torch.randn(16, 4) * 2
    g0, b0 = _leaves(model)
    theta0 = (g0.detach().clone(), b0.detach().clone())

    # step 1
    gamma, beta = _leaves(model)
    logits = _forward(model, x1, gamma, beta)
    h = entropy(logits)
    keep1 = h < e0
    assert 0 < int(keep1.sum()) < 16, "the test needs a batch the entropy filter splits"
    loss = (h[keep1] / torch.exp(h[keep1].detach() - e0)).mean()  # the Fisher term is 0 at theta0
    gg, gb = torch.autograd.grad(loss, [gamma, beta])
    torch.testing.assert_close(eata(x1), logits.detach())
    g1, b1 = (gamma - lr * gg).detach(), (beta - lr * gb).detach()
    torch.testing.assert_close(_params(eata)[0], g1)
    torch.testing.assert_close(_params(eata)[1], b1)
    avg = torch.softmax(logits.detach()[keep1], -1).mean(0)

    # step 2
    gamma, beta = g1.clone().requires_grad_(True), b1.clone().requires_grad_(True)
    logits = _forward(model, x2, gamma, beta)
    h = entropy(logits)
    p = torch.softmax(logits.detach(), -1)
    cos = (p @ avg) / (p.norm(dim=1) * avg.norm())
    keep2 = (h < e0) & (cos.abs() < eps)
    assert int(keep2.sum()) > 0 and int(keep2.sum()) < int((h < e0).sum()), "the redundancy filter must drop some"
    loss = (h[keep2] / torch.exp(h[keep2].detach() - e0)).mean()
    loss = loss + beta_f * ((fisher["backbone.0.weight"] * (gamma - theta0[0]) ** 2).sum()
                            + (fisher["backbone.0.bias"] * (beta - theta0[1]) ** 2).sum())
    gg, gb = torch.autograd.grad(loss, [gamma, beta])
    torch.testing.assert_close(eata(x2), logits.detach())
    torch.testing.assert_close(_params(eata)[0], (gamma - lr * gg).detach())
    torch.testing.assert_close(_params(eata)[1], (beta - lr * gb).detach())
    torch.testing.assert_close(eata.probs, 0.9 * avg + 0.1 * p[keep2].mean(0))
    assert (eata.reliable, eata.kept, eata.seen) == (int(keep1.sum()) + int((h < e0).sum()),
                                                     int(keep1.sum()) + int(keep2.sum()), 32)


def test_eata_nothing_reliable_takes_no_step():
    model = bn_mlp(scale=0.01)  # near-uniform predictions: entropy ~ ln 3 > 0.4 ln 3
    eata = Eata(model, conf(eata=EataSpec(fisher_beta=0.0)))
    before = [p.clone() for p in eata.params]
    eata(torch.randn(6, 4))
    assert eata.updates == 0 and eata.skipped == 1 and eata.probs is None
    assert all(torch.equal(a, b) for a, b in zip(before, eata.params))
    with pytest.raises(ValueError, match="eata.fisher_beta: 0"):
        Eata(model, conf())  # the regulariser needs its Fisher information


def test_fisher_information_is_the_mean_squared_batch_gradient():
    model = bn_mlp()
    torch.manual_seed(1)
    images = torch.randn(10, 4)
    cfg = conf(eata=EataSpec(fisher_samples=9, fisher_batch=4))
    fisher = fisher_information(model, cfg, [{"image": images[:6]}, {"image": images[6:]}])
    sums = [torch.zeros(4), torch.zeros(4)]
    for chunk in (images[:4], images[4:8], images[8:9]):  # 9 samples in batches of 4: 4, 4, then 1 (dropped)
        if len(chunk) < 2:
            continue
        gamma, beta = _leaves(model)
        logits = _forward(model, chunk, gamma, beta)
        loss = F.nll_loss(torch.log_softmax(logits, -1), logits.argmax(-1))
        for s, g in zip(sums, torch.autograd.grad(loss, [gamma, beta])):
            s += g ** 2
    torch.testing.assert_close(fisher["backbone.0.weight"], sums[0] / 2)
    torch.testing.assert_close(fisher["backbone.0.bias"], sums[1] / 2)


def _sar_hand_step(model, x, gamma0, beta0, lr, rho, e0):
    gamma, beta = gamma0.clone().requires_grad_(True), beta0.clone().requires_grad_(True)
    logits = _forward(model, x, gamma, beta)
    h = entropy(logits)
    first = h < e0
    g = torch.autograd.grad(h[first].mean(), [gamma, beta])
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    gp = (gamma + rho * g[0] / (norm + 1e-12)).detach().requires_grad_(True)
    bp = (beta + rho * g[1] / (norm + 1e-12)).detach().requires_grad_(True)
    h2 = entropy(_forward(model, x, gp, bp))[first]
    second = h2 < e0
    loss2 = h2[second].mean()
    g2 = torch.autograd.grad(loss2, [gp, bp])
    return logits.detach(), first, second, float(loss2.detach()), (gamma0 - lr * g2[0]).detach(), (beta0 - lr * g2[1]).detach()


def test_sar_step_equals_hand_computation():
    """Reliable filter, SAM ascent of radius rho along the normalised gradient, the second filter at the
    perturbed point, the descent from the unperturbed weights with the perturbed gradient, the EMA."""
    model = bn_mlp(scale=4.0)
    lr, rho = 0.2, 0.3
    sar = Sar(model, conf(lr=lr, optimizer="sgd", sgd_momentum=0.0, sar=SarSpec(rho=rho, reset_below=0.0)))
    e0 = 0.4 * math.log(C)
    torch.manual_seed(6)
    x1, x2 = torch.randn(12, 4), torch.randn(12, 4) * 1.5
    g0, b0 = (t.detach() for t in _leaves(model))
    out, first, second, l1, g1, b1 = _sar_hand_step(model, x1, g0, b0, lr, rho, e0)
    assert 0 < int(second.sum()) < int(first.sum()) < 12, "the test needs a batch both filters split"
    torch.testing.assert_close(sar(x1), out)
    torch.testing.assert_close(_params(sar)[0], g1)
    torch.testing.assert_close(_params(sar)[1], b1)
    assert sar.ema == pytest.approx(l1)
    out, first, second, l2, g2, b2 = _sar_hand_step(model, x2, g1, b1, lr, rho, e0)
    torch.testing.assert_close(sar(x2), out)
    torch.testing.assert_close(_params(sar)[0], g2)
    assert sar.ema == pytest.approx(0.9 * l1 + 0.1 * l2)
    assert sar.updates == 2 and sar.recoveries == 0


def test_sar_model_recovery_resets_when_the_entropy_average_falls():
    model = bn_mlp(scale=4.0)
    sar = Sar(model, conf(lr=0.2, sar=SarSpec(reset_below=5.0)))  # any average is below 5 nats
    torch.manual_seed(6)
    sar(torch.randn(12, 4))
    assert sar.recoveries == 1 and sar.ema is None and sar.updates == 1
    assert all(torch.equal(p, p0) for p, p0 in zip(sar.params, sar._initial))
    default = Sar(model, conf())
    assert default._reset_below(10) == pytest.approx(0.2 * math.log(10) / math.log(1000))


def test_sar_skips_the_top_layers_like_the_official_code():
    import timm

    from mmalign.tta.source import TimmClassifier

    net = timm.create_model("resnet18", num_classes=3, layers=[1, 1, 1, 1], channels=[4, 4, 4, 4], stem_width=4)
    sar = Sar(TimmClassifier(net.eval()), conf())
    assert sar.param_names and not any("layer4" in n for n in sar.param_names)
    assert any("layer3" in n for n in sar.param_names)
    assert len(Sar(TimmClassifier(net.eval()), conf(sar=SarSpec(skip_top=False))).param_names) > len(sar.param_names)
