"""CLIP/SigLIP losses and the feature cache against single-process global-batch references.

Scaling convention asserted below (W ranks, local batch B, global batch N = W*B):
  * loss:  mean over ranks of the local losses L_r  ==  the single-process loss on the global batch;
  * features: the gradient on rank r's features (after the gathers'/ring's backward)
      ==  W * d(global loss)/d(features of rank r)   -- DDP's 1/W averaging then makes it exact;
  * loss-only scalars (logit scale/bias): mean over ranks of their local gradient == global gradient.
open_clip is imported inside the single-process tests only, so spawned workers start faster.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed
from test_distributed_collectives import from_plain, to_plain
from torch import nn

from mmalign.distributed import all_reduce_sum
from mmalign.losses.contrastive import (
    ClipLoss,
    SigLipLoss,
    clamp_logit_scale_,
    init_logit_bias,
    init_logit_scale,
)
from mmalign.contrastive.feature_cache import feature_cache_backward

TOL = dict(rtol=1e-10, atol=1e-10)  # float64 throughout the exactness checks
SCALE, BIAS = 7.5, -2.0  # away from init so that scale and bias gradients are not tiny

# name -> (loss factory, whether the loss takes a bias). "clip_nograd" is the known bug, expected WRONG.
CASES = {
    "clip": (lambda: ClipLoss(), False),
    "clip_smooth": (lambda: ClipLoss(label_smoothing=0.1), False),
    "clip_nograd": (lambda: ClipLoss(gather_with_grad=False), False),
    "siglip_ring": (lambda: SigLipLoss(exchange="ring"), True),
    "siglip_gather": (lambda: SigLipLoss(exchange="gather"), True),
}
REFERENCE = {"clip_nograd": "clip"}  # the buggy variant must match plain CLIP on the global batch


def _features(n: int, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    # Texts correlated with their images, so positives matter and gradients are not symmetric noise.
    txt = F.normalize(img + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def _run_case(name: str, img: torch.Tensor, txt: torch.Tensor) -> dict:
    """Loss and gradients w.r.t. features, log scale and bias for one loss on the given rows."""
    make, with_bias = CASES[name]
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(SCALE), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    args = (img, txt, log_scale.exp()) + ((bias,) if with_bias else ())
    loss = make()(*args)
    loss.backward()
    return dict(loss=loss.detach(), img=img.grad, txt=txt.grad, scale=log_scale.grad,
                bias=bias.grad if with_bias else torch.zeros((), dtype=torch.float64))


class TwoTower(nn.Module):
    """Tiny linear image/text towers; a micro-batch is a pair (image inputs, text inputs)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)  # identical weights in every process and in the reference
        self.img, self.txt = nn.Linear(5, 4).double(), nn.Linear(6, 4).double()
        self.drop = nn.Dropout(dropout)

    def forward(self, batch):
        x, y = batch
        return F.normalize(self.drop(self.img(x)), dim=-1), F.normalize(self.txt(y), dim=-1)


def _tower_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 6, generator=g, dtype=torch.float64)


def _f64(param: nn.Parameter) -> nn.Parameter:
    # Not param.double(): that returns a non-leaf copy whose .grad stays None (and None == None "passes").
    return nn.Parameter(param.detach().double())


def _full_batch_grads(kind: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Reference: one big batch, one backward, in one process."""
    model, log_scale, bias = TwoTower(), _f64(init_logit_scale(kind)), _f64(init_logit_bias("siglip"))
    img, txt = model((x, y))
    loss = ClipLoss()(img, txt, log_scale.exp()) if kind == "clip" else SigLipLoss()(img, txt, log_scale.exp(), bias)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads.update(log_scale=log_scale.grad, bias=bias.grad if kind == "siglip" else torch.zeros((), dtype=torch.float64))
    return dict(loss=loss.detach(), **grads)


def _cached_grads(kind: str, micro_batches: list, model: nn.Module, no_sync=None, **kwargs) -> dict:
    log_scale, bias = _f64(init_logit_scale(kind)), _f64(init_logit_bias("siglip"))
    clip, siglip = ClipLoss(), SigLipLoss()

    def loss_fn(img, txt):  # closes over the loss parameters: they get their gradient in the loss backward
        return clip(img, txt, log_scale.exp()) if kind == "clip" else siglip(img, txt, log_scale.exp(), bias)

    loss = feature_cache_backward(model, micro_batches, loss_fn, no_sync=no_sync, **kwargs)
    grads = {n: p.grad.clone() for n, p in getattr(model, "module", model).named_parameters() if p.grad is not None}
    grads.update(log_scale=log_scale.grad, bias=bias.grad if kind == "siglip" else torch.zeros((), dtype=torch.float64))
    return dict(loss=loss, **grads)


# ---------------------------------------------------------------- multi-process workers

K_MICRO, B_MICRO = 3, 2  # feature cache: 3 micro-batches of 2 per rank


def _loss_worker(rank: int, world: int, img_np, txt_np) -> dict:
    img_all, txt_all = torch.from_numpy(img_np), torch.from_numpy(txt_np)
    b = img_all.shape[0] // world
    rows = slice(rank * b, (rank + 1) * b)
    out = {name: _run_case(name, img_all[rows], txt_all[rows]) for name in CASES}
    _, logits_i, logits_t = ClipLoss()(img_all[rows], txt_all[rows], SCALE, return_logits=True)
    out["logits"] = (logits_i, logits_t)

    # Unequal per-rank batch sizes: every rank raises the same clear error instead of hanging.
    errors = []
    for loss, extra in ((ClipLoss(), ()), (SigLipLoss(), (BIAS,))):
        try:
            loss(img_all[: 2 + rank], txt_all[: 2 + rank], SCALE, *extra)
        except ValueError as e:
            errors.append(str(e))
    out["size_errors"] = errors

    # Feature cache under real DDP (gloo): k micro-batches per rank, ClipLoss gathering across ranks.
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _tower_inputs(world * K_MICRO * B_MICRO)
    mine = slice(rank * K_MICRO * B_MICRO, (rank + 1) * K_MICRO * B_MICRO)
    x, y = x[mine], y[mine]  # rank-major: this rank's rows of the global batch, micro-batches in order
    micro = [(x[i * B_MICRO : (i + 1) * B_MICRO], y[i * B_MICRO : (i + 1) * B_MICRO]) for i in range(K_MICRO)]
    ddp = DDP(TwoTower())
    cached = _cached_grads("clip", micro, ddp, no_sync=ddp.no_sync)
    # DDP averaged the tower gradients; the log scale is outside DDP, so average it the same way.
    cached["log_scale"] = all_reduce_sum(cached["log_scale"]) / world
    out["cache"] = cached
    return to_plain(out)


def _check_distributed(world: int) -> None:
    img, txt = _features(world * 3)
    results = [from_plain(r) for r in run_distributed(_loss_worker, world_size=world, args=(img.numpy(), txt.numpy()))]
    b = img.shape[0] // world
    for name in CASES:
        ref = _run_case(REFERENCE.get(name, name), img, txt)
        per_rank = [r[name] for r in results]
        mean_loss = sum(r["loss"] for r in per_rank) / world
        torch.testing.assert_close(mean_loss, ref["loss"], **TOL, msg=f"{name}: mean of local losses")
        if name == "clip_nograd":
            # Same loss value, wrong gradients: off by far more than rounding for both modalities.
            for key in ("img", "txt"):
                got = torch.cat([r[key] for r in per_rank])
                assert (got - world * ref[key]).abs().max() > 1e-2, f"gather_with_grad=False gave exact {key} grads?"
            continue
        for r, res in enumerate(per_rank):
            rows = slice(r * b, (r + 1) * b)
            for key in ("img", "txt"):
                torch.testing.assert_close(res[key], world * ref[key][rows], **TOL, msg=f"{name} rank {r} {key} grad")
        for key in ("scale", "bias"):
            mean_grad = sum(r[key] for r in per_rank) / world
            torch.testing.assert_close(mean_grad, ref[key], **TOL, msg=f"{name}: mean {key} grad")

    global_logits = SCALE * img @ txt.T
    for r, res in enumerate(results):
        logits_i, logits_t = res["logits"]
        torch.testing.assert_close(logits_i, global_logits[r * b : (r + 1) * b], **TOL)
        torch.testing.assert_close(logits_t, global_logits.T[r * b : (r + 1) * b], **TOL)
        assert len(res["size_errors"]) == 2
        for e in res["size_errors"]:
            assert "per-rank batch sizes or feature dims differ" in e and "drop_last=True" in e, e

    x, y = _tower_inputs(world * K_MICRO * B_MICRO)
    ref = _full_batch_grads("clip", x, y)
    torch.testing.assert_close(sum(r["cache"]["loss"] for r in results) / world, ref["loss"], **TOL)
    assert all(v is not None for v in ref.values())
    for r, res in enumerate(results):
        assert set(res["cache"]) == set(ref)
        for key in ref:
            if key != "loss":
                torch.testing.assert_close(res["cache"][key], ref[key], **TOL, msg=f"feature cache rank {r} {key}")


@pytest.mark.distributed
def test_distributed_two_processes():
    _check_distributed(2)  # SigLIP ring: one one-way step


@pytest.mark.distributed
def test_distributed_three_processes():
    _check_distributed(3)  # SigLIP ring: one bidirectional step


@pytest.mark.distributed
def test_distributed_four_processes():
    _check_distributed(4)  # SigLIP ring: one bidirectional plus one one-way step


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_clip_and_siglip_match_open_clip(dtype, tol):
    import open_clip.loss as oc

    img, txt = (t.to(dtype) for t in _features(6, d=8))
    scale, bias = torch.tensor(SCALE, dtype=dtype), torch.tensor(BIAS, dtype=dtype)

    def value_and_grads(fn):
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        loss = fn(i, t)
        loss.backward()
        return loss.detach(), i.grad, t.grad

    pairs = [(lambda i, t: ClipLoss()(i, t, scale), lambda i, t: oc.ClipLoss()(i, t, scale))]
    for exchange in ("ring", "gather"):
        pairs.append((lambda i, t, e=exchange: SigLipLoss(exchange=e)(i, t, scale, bias),
                      lambda i, t: oc.SigLipLoss()(i, t, scale, bias)))
    for ours, theirs in pairs:
        for a, b in zip(value_and_grads(ours), value_and_grads(theirs)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_clip_label_smoothing_by_hand():
    img, txt = _features(5)
    eps, n = 0.1, img.shape[0]
    target = (1 - eps) * torch.eye(n, dtype=torch.float64) + eps / n  # smoothing over all N candidates
    logits = SCALE * img @ txt.T
    by_hand = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(ClipLoss(label_smoothing=eps)(img, txt, SCALE), by_hand, **TOL)
    assert not torch.allclose(ClipLoss()(img, txt, SCALE), by_hand)


def test_siglip_by_hand_and_return_logits():
    img, txt = _features(4)
    logits = SCALE * img @ txt.T + BIAS
    z = 2 * torch.eye(4, dtype=torch.float64) - 1
    torch.testing.assert_close(SigLipLoss()(img, txt, SCALE, BIAS), -F.logsigmoid(z * logits).sum() / 4, **TOL)
    loss, li, lt = ClipLoss()(img, txt, SCALE, return_logits=True)
    torch.testing.assert_close(li, SCALE * img @ txt.T, **TOL)
    torch.testing.assert_close(lt, li.T, **TOL)


def test_label_cache_is_reused():
    loss = ClipLoss()
    first = loss.labels(torch.device("cpu"), 4, 0)
    assert loss.labels(torch.device("cpu"), 4, 0) is first
    assert loss.labels(torch.device("cpu"), 4, 4).tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("loss,extra", [(ClipLoss(), ()), (SigLipLoss(), (BIAS,))])
def test_input_errors(loss, extra):
    img, txt = _features(3)
    with pytest.raises(ValueError, match="at least 2 image-text pairs.*no negatives.*Raise the batch size"):
        loss(img[:1], txt[:1], SCALE, *extra)
    with pytest.raises(ValueError, match=r"\(3, 4\) and text_features \(2, 4\) must have the same shape"):
        loss(img, txt[:2], SCALE, *extra)
    with pytest.raises(ValueError, match=r"\(3, 4\) and text_features \(3, 3\)"):
        loss(img, txt[:, :3], SCALE, *extra)
    with pytest.raises(ValueError, match="shape \\[batch, dim\\].*3 dims"):
        loss(img[None], txt, SCALE, *extra)
    with pytest.raises(ValueError, match="text_features contain NaN"):
        loss(img, txt.clone().index_fill_(0, torch.tensor([1]), float("nan")), SCALE, *extra)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        loss(img, txt, torch.ones(2), *extra)


def test_constructor_and_helper_errors():
    with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\), got 1.5"):
        ClipLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="exchange must be 'ring' or 'gather', got 'tree'"):
        SigLipLoss(exchange="tree")
    with pytest.raises(ValueError, match="kind must be one of"):
        init_logit_scale("cosine")
    with pytest.raises(ValueError, match="kind='clip'"):
        init_logit_bias("clip")


def test_logit_parameter_helpers():
    assert math.isclose(init_logit_scale("clip").item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(init_logit_scale("siglip").exp().item(), 10.0, rel_tol=1e-6)
    assert init_logit_bias("siglip").item() == -10.0
    t = init_logit_scale("clip", value=math.log(500.0))
    assert isinstance(t, nn.Parameter) and t.dim() == 0
    clamp_logit_scale_(t)
    assert math.isclose(t.exp().item(), 100.0, rel_tol=1e-6)
    clamp_logit_scale_(t, max_scale=200.0, min_scale=150.0)
    assert math.isclose(t.exp().item(), 150.0, rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_feature_cache_equals_full_batch(kind):
    x, y = _tower_inputs(9)
    sizes = [4, 2, 3]  # k = 3 micro-batches, unequal on purpose
    bounds = np.cumsum([0] + sizes)
    micro = [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    ref, got = _full_batch_grads(kind, x, y), _cached_grads(kind, micro, TwoTower())
    assert set(got) == set(ref) and all(v is not None for v in ref.values())
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], **TOL, msg=f"{kind} {key}")
    # Teeth: plain accumulation of per-micro-batch losses (fewer negatives) gives other gradients.
    plain = TwoTower()
    for xm, ym in micro:
        img, txt = plain((xm, ym))
        ClipLoss()(img, txt, SCALE).backward() if kind == "clip" else SigLipLoss()(img, txt, SCALE, BIAS).backward()
    assert not torch.allclose(plain.img.weight.grad, ref["img.weight"], atol=1e-3)


def test_feature_cache_replays_dropout_and_frozen_tower():
    x, y = _tower_inputs(6)
    micro = [(x[:3], y[:3]), (x[3:], y[3:])]
    model = TwoTower(dropout=0.5)
    model.txt.requires_grad_(False)  # a frozen tower (LiT) is cached but not re-run through
    _cached_grads("clip", micro, model, check_rerun=True)  # same dropout masks on the re-run
    assert model.txt.weight.grad is None and model.img.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="differs from the first pass"):
        _cached_grads("clip", micro, TwoTower(dropout=0.5), preserve_rng=False, check_rerun=True)


def test_feature_cache_errors():
    with pytest.raises(ValueError, match="at least one micro-batch"):
        feature_cache_backward(lambda b: b, [], lambda *f: f[0].sum())
    with pytest.raises(TypeError, match="must return a tensor or a non-empty tuple"):
        feature_cache_backward(lambda b: "oops", [1], lambda *f: f[0].sum())
    with pytest.raises(ValueError, match="scalar"):
        feature_cache_backward(lambda b: torch.ones(2, 2, requires_grad=True), [1], lambda f: f)
