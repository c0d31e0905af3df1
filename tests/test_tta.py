"""TTA methods: hand-computed TENT and filter steps, CAFA, reset/episodic semantics, edge cases."""

import copy
import math

import pytest
import torch
from torch import nn

from mmalign.tta.cafa_stats import SourceStats, compute_source_stats, stats_path_for
from mmalign.tta.losses import cafa_loss, crowd_filter_mask, filtered_entropy_loss, mahalanobis_sq, softmax_entropy
from mmalign.tta.methods import Norm, TTAMethod, Tent, TentFilter, build_method
from mmalign.tta.source import SplitClassifier, TimmClassifier
from mmalign.tta.stream import run_stream

from _tta import bn_mlp, conf, entropy, hand_bn1d, tiny_cnn


def test_tent_step_equals_hand_computation():
    model = tiny_cnn()
    x = torch.randn(6, 3, 5, 5)
    lr = 1e-2
    tent = Tent(model, conf(lr=lr))
    logits = tent(x)

    conv, bn = model.backbone[0], model.backbone[1]
    gamma = bn.weight.detach().clone().requires_grad_(True)
    beta = bn.bias.detach().clone().requires_grad_(True)
    h = conv(x).detach()
    mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    z = (h - mu) / torch.sqrt(var + bn.eps) * gamma[None, :, None, None] + beta[None, :, None, None]
    hand_logits = model.head(z.relu().mean((2, 3)))
    p = hand_logits.softmax(-1)
    loss = -(p * p.log()).sum(-1).mean()
    g_gamma, g_beta = torch.autograd.grad(loss, [gamma, beta])
    torch.testing.assert_close(logits, hand_logits.detach(), rtol=1e-5, atol=1e-6)  # prediction = same forward
    # first Adam step: m_hat = g, v_hat = g^2  ->  delta = -lr * g / (|g| + eps)
    for got, p0, g in ((tent.model.backbone[1].weight, gamma, g_gamma), (tent.model.backbone[1].bias, beta, g_beta)):
        torch.testing.assert_close(got.detach(), p0.detach() - lr * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-6)
    # only norm affine parameters train; the source is untouched
    torch.testing.assert_close(tent.model.head.weight, model.head.weight)
    # the source keeps its statistics; the adapted copy exports the source statistics it was given
    sd = tent.adapted_state_dict()
    torch.testing.assert_close(sd["backbone.1.running_mean"], bn.running_mean)
    torch.testing.assert_close(sd["backbone.1.running_var"], bn.running_var)
    assert tent.updates == 1


def test_filter_keeps_exactly_non_dropping_samples():
    p_orig = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5], [0.9, 0.1]])
    p_adapt = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5], [0.2, 0.8]])
    # c_o = [0, 1, 0, 0]; p_adapt[c_o] = .7 .6 .5 .2 vs p_orig[c_o] = .6 .7 .5 .9
    assert crowd_filter_mask(p_adapt, p_orig).tolist() == [True, False, True, False]
    # softmax rows: [1/4, 3/4], (dropped), [1/2, 1/2], (dropped)
    logits = torch.tensor([[0.0, math.log(3)], [5.0, -5.0], [1.0, 1.0], [-2.0, 3.0]], requires_grad=True)
    keep = torch.tensor([True, False, True, False])
    loss = filtered_entropy_loss(logits, keep, alpha=0.5)
    # mean entropy of the kept rows, minus 0.5 x the entropy of their mean prediction [3/8, 5/8]
    h_kept = (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) + math.log(2)) / 2
    expected = h_kept + 0.5 * (3 / 8 * math.log(3 / 8) + 5 / 8 * math.log(5 / 8))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[~keep].abs().sum() == 0  # dropped samples give no gradient


def test_filter_whole_batch_diversity_reads_every_sample():
    """diversity="batch" (the public reimplementation): the mean prediction is the batch's, so the
    rejected samples get gradient from that term alone; with nothing kept the term still applies."""
    # softmax rows: [1/3, 1/3, 1/3], [1/2, 1/4, 1/4], [1/4, 1/2, 1/4], [1/8, 1/8, 3/4]
    ln2 = math.log(2)
    logits = torch.tensor([[0.0, 0.0, 0.0], [ln2, 0.0, 0.0], [0.0, ln2, 0.0], [0.0, 0.0, math.log(6)]],
                          requires_grad=True)
    keep = torch.tensor([True, False, True, False])
    loss = filtered_entropy_loss(logits, keep, alpha=0.5, diversity="batch")
    h_kept = (math.log(3) + 1.5 * ln2) / 2  # entropies of rows 0 and 2
    mean_p = [(1 / 3 + 1 / 2 + 1 / 4 + 1 / 8) / 4, (1 / 3 + 1 / 4 + 1 / 2 + 1 / 8) / 4, (1 / 3 + 1 / 4 + 1 / 4 + 3 / 4) / 4]
    neg_h_mean = sum(q * math.log(q) for q in mean_p)  # of the WHOLE batch's mean prediction
    assert float(loss) == pytest.approx(h_kept + 0.5 * neg_h_mean, rel=1e-6)
    loss.backward()
    assert logits.grad[~keep].abs().sum() > 0
    none_kept = filtered_entropy_loss(logits.detach(), torch.zeros(4, dtype=torch.bool), alpha=0.5, diversity="batch")
    assert float(none_kept) == pytest.approx(0.5 * neg_h_mean, rel=1e-6)
    with pytest.raises(ValueError, match="diversity='kep'"):
        filtered_entropy_loss(logits, keep, diversity="kep")


def test_filter_step_with_the_real_frozen_original():
    """Two TentFilter steps (SGD, no momentum) against a hand computation: the first step keeps every
    sample (adapted = original); in the second the frozen source model, under the same batch
    statistics, decides which samples the entropy is minimised on."""
    model = bn_mlp()
    lr, alpha = 0.5, 0.5
    method = TentFilter(model, conf(lr=lr, optimizer="sgd", sgd_momentum=0.0))
    bn, head = model.backbone[0], model.head
    g0, b0 = bn.weight.detach().clone(), bn.bias.detach().clone()
    torch.manual_seed(3)
    x1, x2 = torch.randn(8, 4), torch.randn(8, 4) * 1.5 + 0.3

    def hand_step(x, gamma, beta):
        gamma, beta = gamma.clone().requires_grad_(True), beta.clone().requires_grad_(True)
        logits = head(hand_bn1d(x, gamma, beta, bn.running_mean, bn.running_var, 0.0))
        with torch.no_grad():
            p_orig = torch.softmax(head(hand_bn1d(x, g0, b0, bn.running_mean, bn.running_var, 0.0)), -1)
        c = p_orig.argmax(-1)
        p = torch.softmax(logits, -1).detach()
        keep = p[torch.arange(len(x)), c] >= p_orig[torch.arange(len(x)), c]
        mean_p = torch.softmax(logits[keep], -1).mean(0)
        loss = entropy(logits[keep]).mean() + alpha * (mean_p * torch.log(mean_p)).sum()
        gg, gb = torch.autograd.grad(loss, [gamma, beta])
        return logits.detach(), keep, (gamma - lr * gg).detach(), (beta - lr * gb).detach()

    out1, keep1, g1, b1 = hand_step(x1, g0, b0)
    torch.testing.assert_close(method(x1), out1)
    assert keep1.all() and method.last["kept"] == 1.0
    out2, keep2, g2, b2 = hand_step(x2, g1, b1)
    assert 0 < int(keep2.sum()) < len(x2), "the test needs a batch the filter splits"
    torch.testing.assert_close(method(x2), out2)
    assert method.last["kept"] == keep2.float().mean().item()
    torch.testing.assert_close(method.model.backbone[0].weight.detach(), g2)
    torch.testing.assert_close(method.model.backbone[0].bias.detach(), b2)
    assert (method.kept, method.seen) == (8 + int(keep2.sum()), 16)


def test_empty_filter_selection_no_update_no_nan():
    """An adapted model whose norm layer outputs zeros predicts uniformly: no sample keeps the
    original's confidence in its class, so nothing is minimised, no step is taken and nothing is NaN."""
    assert filtered_entropy_loss(torch.randn(3, 4), torch.zeros(3, dtype=torch.bool)) is None
    model = bn_mlp()
    with torch.no_grad():
        model.head.bias.zero_()
    method = TentFilter(model, conf())
    with torch.no_grad():
        method.model.backbone[0].weight.zero_()
        method.model.backbone[0].bias.zero_()
    before = [p.detach().clone() for p in method.params]
    logits = method(torch.randn(4, 4))
    assert torch.isfinite(logits).all()
    assert method.updates == 0 and method.skipped == 1 and method.last["kept"] == 0.0
    assert (method.kept, method.seen, method.kept_fraction) == (0, 4, 0.0)
    for p, p0 in zip(method.params, before):
        assert torch.equal(p, p0)


def test_cafa_loss_lowers_intra_class_mahalanobis():
    torch.manual_seed(0)
    d, n = 2, 200
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    y = torch.arange(2).repeat_interleave(n)
    source_x = centers[y] + 0.5 * torch.randn(2 * n, d)
    # features = LayerNorm-free affine "norm" layer (BatchNorm1d) of the input; head = nearest centre
    backbone = nn.BatchNorm1d(d)
    with torch.no_grad():
        backbone.running_mean.zero_()
        backbone.running_var.fill_(1.0)
    head = nn.Linear(d, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        head.bias.zero_()
    model = SplitClassifier(backbone, head).eval()
    stats = compute_source_stats(model, [{"image": source_x, "label": y}], 2, covariance="shared", shrinkage=0.0)
    # shift: within-class noise inflated along the irrelevant axis
    target_x = centers[y] + torch.randn(2 * n, d) * torch.tensor([0.5, 3.0])
    cafa = build_method("cafa", model, conf(lr=0.05), stats)

    def intra():
        with torch.no_grad():
            _, f = cafa.model.forward_with_features(target_x)
            return mahalanobis_sq(f, stats.means, stats.precision).gather(1, y[:, None]).mean().item()

    before = intra()
    losses = []
    for _ in range(30):
        cafa(target_x)
        losses.append(cafa.last["loss"])
    assert intra() < 0.7 * before
    assert losses[-1] < losses[0]


def test_cafa_loss_denominators():
    feats, means = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logits = torch.tensor([[1.0, 0.0]])
    prec = torch.eye(2)
    # D = [1, 4], y = 0
    torch.testing.assert_close(cafa_loss(feats, logits, means, prec, "all"), torch.tensor(1 / 5).log())
    torch.testing.assert_close(cafa_loss(feats, logits, means, prec, "others"), torch.tensor(1 / 4).log())
    torch.testing.assert_close(mahalanobis_sq(feats, means, torch.stack([prec, 2 * prec])), torch.tensor([[1.0, 8.0]]))


def test_source_stats_match_numpy_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    f = torch.randn(50, 3, dtype=torch.float64)
    y = torch.arange(50) % 2
    ident = SplitClassifier(nn.Identity(), nn.Linear(3, 2).double())
    stats = compute_source_stats(ident, [{"image": f[:30], "label": y[:30]}, {"image": f[30:], "label": y[30:]}], 2,
                                 covariance="shared", shrinkage=0.2)
    means = torch.stack([f[y == c].mean(0) for c in range(2)])
    centred = f - means[y]
    cov = centred.T @ centred / (50 - 2)
    cov = 0.8 * cov + 0.2 * cov.trace() / 3 * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(stats.means, means.float())
    torch.testing.assert_close(stats.precision, torch.linalg.inv(cov).float(), rtol=1e-4, atol=1e-5)
    cw = compute_source_stats(ident, [{"image": f, "label": y}], 2, covariance="classwise", max_samples=40)
    assert cw.precision.shape == (2, 3, 3) and cw.meta["num_samples"] == 40
    path = stats_path_for(str(tmp_path / "last.ckpt"))
    assert path.endswith("last.cafa_stats.pt")
    stats.save(path)
    torch.testing.assert_close(SourceStats.load(path).precision, stats.precision)
    with pytest.raises(ValueError, match="no source sample"):
        compute_source_stats(ident, [{"image": f, "label": torch.zeros(50, dtype=torch.long)}], 2)


class FakeStream:
    domain_names = ["a/5", "b/5"]

    def __init__(self):
        torch.manual_seed(1)
        self.data = {d: [(torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
                     for d in self.domain_names}

    def domain_batches(self, domain, batch_size=None):
        for x, y in self.data[domain]:
            yield {"image": x, "label": y}


def _logged(method):
    out = []
    call = method.__call__

    class Spy:
        resets = 0

        def reset(self):
            Spy.resets += 1
            method.reset()

        def __call__(self, x, **kwargs):
            out.append(call(x, **kwargs))
            return out[-1]

        def __getattr__(self, name):  # counters and state of the method itself
            return getattr(method, name)

    return Spy(), out


@pytest.mark.parametrize("setting,resets", [("continual", 0), ("reset", 4), ("episodic", 12)])
def test_reset_and_episodic_semantics(setting, resets):
    model, stream = tiny_cnn(), FakeStream()
    norm_spy, norm_out = _logged(Norm(model, conf()))
    tent_spy, tent_out = _logged(Tent(model, conf(lr=0.05)))
    res = run_stream({"norm": norm_spy, "tent": tent_spy}, stream, setting, rounds=2)
    assert type(tent_spy).resets == resets
    same = [torch.allclose(a, b, atol=1e-6) for a, b in zip(norm_out, tent_out)]
    if setting == "episodic":
        assert all(same)  # every batch sees the source parameters
    elif setting == "reset":
        assert [same[i] for i in (0, 3, 6, 9)] == [True] * 4  # first batch of each domain
        assert not all(same)
    else:
        assert same[0] and not any(same[1:])
    assert len(res.records) == 2 * 2 * 2 * 3 and res.rounds == 2


def test_reset_restores_parameters_and_optimizer():
    model = tiny_cnn()
    tent, x = Tent(model, conf(lr=0.1, prior=8.0, momentum=0.3)), torch.randn(4, 3, 5, 5)
    first = tent(x)
    tent(x)
    tent.reset()
    assert len(tent.optimizer.state) == 0  # fresh Adam moments
    for p, p0 in zip(tent.params, tent._initial):
        assert torch.equal(p, p0)
    for (m, v), (m0, v0) in zip(tent.norm.ref.values(), tent.norm.source.values()):  # running stats back too
        assert torch.equal(m, m0) and torch.equal(v, v0)
    torch.testing.assert_close(tent(x), first)


def test_batch_size_one_batchnorm():
    model = tiny_cnn()
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match="adapt.min_batch"):
        Tent(model, conf(small_batch="error"))(x)
    tent = Tent(model, conf(small_batch="predict"))  # prior 0: the source statistics
    torch.testing.assert_close(tent(x), model(x))
    assert tent.updates == 0 and tent.small_batches == 1
    mixed = Tent(model, conf(small_batch="predict", prior=16.0))  # prior-mixed statistics, one sample
    bn, conv = model.backbone[1], model.backbone[0]
    h = conv(x).detach()
    w = 16 / 17
    mu = w * bn.running_mean + (1 - w) * h.mean((0, 2, 3))
    var = w * bn.running_var + (1 - w) * h.var((0, 2, 3), unbiased=False)
    z = (h - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    z = z * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(mixed(x), model.head(z.relu().mean((2, 3))).detach(), rtol=1e-5, atol=1e-6)
    assert mixed.updates == 0 and mixed.small_batches == 1
    assert TTAMethod(model)(x).shape == (1, 3)  # the source needs no batch statistics


def test_dropout_stays_off():
    model = tiny_cnn(dropout=0.9)
    x = torch.randn(8, 3, 5, 5)
    norm = Norm(model)
    torch.testing.assert_close(norm(x), norm(x))
    tent = Tent(model)
    tent(x)
    assert not any(m.training for m in tent.model.modules())


def test_timm_adapters_resnet_and_vit():
    import timm

    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=5, layers=[1, 1, 1, 1], channels=[8, 8, 8, 8],
                               stem_width=8).eval()
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=16, patch_size=8, depth=1,
                            embed_dim=16, num_heads=2).eval()
    x = torch.randn(4, 3, 16, 16)
    for net, norms in ((resnet, "batchnorm"), (vit, "layernorm")):
        model = TimmClassifier(net)
        logits, feats = model.forward_with_features(x)
        torch.testing.assert_close(logits, net(x))
        assert feats.shape == (4, net.num_features)
        tent = Tent(model, conf(norms=norms, lr=0.1))
        before = copy.deepcopy(tent.model.state_dict())
        tent(x)
        changed = {k for k, v in tent.model.state_dict().items() if k in before and not torch.equal(v, before[k])}
        norm_keys = {f"{n}.{w}" for n, m in tent.model.named_modules()
                     if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for w in ("weight", "bias")}
        assert changed and changed <= norm_keys, changed - norm_keys
    with pytest.raises(ValueError, match="selects no affine norm layer"):
        Tent(TimmClassifier(vit), conf(norms="batchnorm"))
    sel = Tent(TimmClassifier(resnet), conf(norms=["layer4"]))
    assert len(sel.params) == 2 * sum(1 for n, m in resnet.named_modules()
                                      if n.startswith("layer4") and isinstance(m, nn.BatchNorm2d))


def test_error_table_header_keeps_columns_apart():
    """Issue 26: the header ran "satumean r1mean r3" together when domain names were short."""
    from mmalign.tta.report import error_table
    from mmalign.tta.results import StreamResult

    res = StreamResult(["source", "tent"], ["saturate/5", "fog/5"], 3, "continual")
    for rnd in range(3):
        for m in ("source", "tent"):
            for d in res.domains:
                res.records.append({"method": m, "round": rnd, "domain": d, "batch": 0, "n": 10, "wrong": 1 + rnd,
                                    "entropy": 2.0, "agree": 10, "kept": None, "small": False, "reset": False})
    head = error_table(res).splitlines()[1]
    assert head.split() == ["method", "satu5", "fog5", "mean", "r1", "mean", "r3"]
    assert "  mean r1" in head and "  mean r3" in head
    row = error_table(res).splitlines()[3].split()
    assert row == ["source", "30.0", "30.0", "10.0", "30.0"]
