"""Alignment losses, projector/upsampling shapes, samplers and EMA (no Lightning)."""

import pytest
import torch

from mmalign.repa.losses import manifold_loss, repa_cosine_loss
from mmalign.repa.projector import AlignmentHead, upsample_tokens
from mmalign.diffusion.ema import EMA
from mmalign.diffusion.sampling import sample


def test_cosine_is_minus_one_and_manifold_zero_at_target():
    y = torch.randn(4, 64, 16)
    assert torch.allclose(repa_cosine_loss(y.clone(), y), torch.tensor(-1.0), atol=1e-6)
    assert torch.allclose(repa_cosine_loss(3 * y, y), torch.tensor(-1.0), atol=1e-6)
    for mode in ("token", "sample"):
        assert manifold_loss(y.clone(), y, mode).abs() < 1e-6
        assert manifold_loss(torch.randn_like(y), y, mode) > 0.01
    assert repa_cosine_loss(torch.randn_like(y), y) > -0.5


def test_losses_float32_under_half_inputs():
    y = torch.randn(2, 16, 8).to(torch.bfloat16)
    assert repa_cosine_loss(y, y).dtype == torch.float32 and manifold_loss(y, y).dtype == torch.float32
    with pytest.raises(ValueError, match="differ"):
        repa_cosine_loss(torch.randn(2, 16, 8), torch.randn(2, 16, 9))
    with pytest.raises(ValueError, match="manifold mode"):
        manifold_loss(y, y, "pixel")


def test_sample_mode_compares_across_batch():
    y = torch.randn(4, 9, 8)
    # permuting tokens inside every image identically leaves the B x B matrices per position set unchanged
    # only if positions are permuted consistently; swapping two *images* in pred changes the sample matrices
    pred = y[[1, 0, 2, 3]]
    assert manifold_loss(pred, y, "sample") > 0.01
    # token mode: reordering the tokens of both sides the same way permutes both similarity matrices
    # alike, so the (mean squared) difference is unchanged, and positive for different features
    other, perm = torch.randn_like(y), torch.randperm(9)
    before = manifold_loss(other, y, "token")
    assert before > 0.01
    torch.testing.assert_close(manifold_loss(other[:, perm], y[:, perm], "token"), before)


def test_manifold_loss_by_hand():
    # one image, two 2-D tokens. pred: (1,0), (0,1) -> cosines [[1, 0], [0, 1]];
    # target: (1,0), (1,1) -> [[1, 1/sqrt2], [1/sqrt2, 1]]; squared differences 0, 1/2, 1/2, 0 -> mean 1/4
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert float(manifold_loss(pred, target, "token")) == pytest.approx(0.25, abs=1e-6)
    # sample mode: one sample per position, so every B x B matrix is [[1]] and the loss is 0
    assert float(manifold_loss(pred, target, "sample")) == pytest.approx(0.0, abs=1e-7)


def test_upsampling_8_to_16_shapes():
    head = AlignmentHead(in_dim=48, hidden_dim=32, out_dim=24, target_grid=16)
    out = head(torch.randn(2, 48, 8, 8))  # U-Net middle-stage map
    assert out.shape == (2, 256, 24)
    assert upsample_tokens(torch.randn(2, 64, 5), 16).shape == (2, 256, 5)
    assert AlignmentHead(48, 32, 24, 8)(torch.randn(2, 64, 48)).shape == (2, 64, 24)  # DiT tokens, no upsampling


def test_samplers_integrate_constant_velocity_exactly():
    noise = torch.randn(3, 2, 4, 4)
    data = torch.randn(3, 2, 4, 4)
    fn = lambda x, t, y: noise - data  # noqa: E731  the exact velocity of the linear path
    for method in ("euler", "heun"):
        out = sample(fn, noise, torch.zeros(3, dtype=torch.long), 5, 4, method)
        assert torch.allclose(out, data, atol=1e-5)


def test_cfg_only_inside_guidance_interval():
    calls = []

    def fn(x, t, y):
        calls.append((float(t[0]), len(y)))
        return torch.where((y == 7).view(-1, 1, 1, 1), torch.ones_like(x), torch.zeros_like(x))

    x = torch.zeros(2, 1, 2, 2)
    out = sample(fn, x, torch.zeros(2, dtype=torch.long), 7, steps=4, method="euler", cfg_scale=3.0,
                 guidance_interval=(0.3, 0.8))
    guided = [t for t, n in calls if n == 4]
    assert guided == [0.75, 0.5] and all(n == 2 for t, n in calls if t not in guided)
    # conditional v_c = 0, null v_u = 1: guided v = 1 + 3 (0 - 1) = -2 on the two guided steps (dt = -0.25),
    # unguided v = v_c = 0 elsewhere -> x = 0 + 2 * 0.25 * 2 = 1
    assert torch.allclose(out, torch.ones_like(out))


def test_ema_tracks_and_has_no_grad():
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, decay=0.5, warmup=False)
    assert not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.module.weight.clone()
    ema.update(net, 0)
    assert torch.allclose(ema.module.weight, 0.5 * before + 0.5 * net.weight)


def test_ema_warmup_follows_the_step():
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, decay=0.999)
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.module.weight.clone()
    ema.update(net, 0)  # d_0 = min(0.999, 1 / 10)
    assert torch.allclose(ema.module.weight, 0.1 * before + 0.9 * net.weight, atol=1e-6)
    assert int(ema.n_averaged) == 2 and not ema.train().training
