"""Representation metrics behind REPA's mechanism claim and the teacher score: linear probes, CKNNA, iREPA's
spatial structure, hidden-state probes of a backbone."""

import math

import pytest
import torch

from mmalign.evaluation.representation import cknna, linear_probe_accuracy, spatial_structure


def test_linear_probe_separates_what_is_there_and_not_what_is_not():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    centres = torch.randn(4, 16, generator=g) * 3
    x = centres[y] + torch.randn(400, 16, generator=g)
    assert linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:]) == 1.0
    shuffled = y[torch.randperm(400, generator=g)]
    assert linear_probe_accuracy(x[:300], shuffled[:300], x[300:], shuffled[300:]) < 0.45  # chance 0.25


def test_cknna_sees_shared_neighbourhoods():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 32, generator=g)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    assert cknna(a, a @ q) == pytest.approx(1.0, abs=1e-6)  # a rotation keeps every kernel entry
    assert abs(cknna(a, torch.randn(200, 48, generator=g))) < 0.1
    half = a.clone()
    half[100:] = torch.randn(100, 32, generator=g)
    assert 0.2 < cknna(a, half) < 0.9
    # the same 10 clusters with independent noise inside each: globally alike (linear CKA 0.92) but the
    # nearest neighbours disagree, and CKNNA, which compares kernels on mutual neighbours only, sees it
    c = torch.arange(200) % 10
    centres = torch.randn(10, 16, generator=g)
    x, y = (centres[c] + 0.3 * torch.randn(200, 16, generator=g) for _ in range(2))
    assert cknna(x, y) < 0.6
    with pytest.raises(ValueError, match="same samples"):
        cknna(a, a[:100])


def _smooth_tokens(b=4, side=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    freq = torch.randn(d, 2, generator=g) * 0.6
    yy, xx = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1)  # (N, 2)
    phase = torch.rand(b, 1, d, generator=g) * 2 * math.pi
    return torch.sin(pos @ freq.T + phase)  # (B, N, D): nearby patches alike


def test_spatial_structure_scores_locality():
    tokens = _smooth_tokens()
    smooth = spatial_structure(tokens)
    perm = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(1))
    shuffled = spatial_structure(tokens[:, perm])
    assert smooth["lds"] > 0.3 and smooth["cds"] > 0.03
    assert abs(shuffled["lds"]) < 0.1 and abs(shuffled["cds"]) < 0.02
    with pytest.raises(ValueError, match="square grid"):
        spatial_structure(tokens[:, :10])


def test_probe_report_reads_the_image_not_the_label():
    """A random DiT's hidden states at a block separate images by what they show; the probe runs with the null
    class, so the label fed to the model carries nothing (shuffled labels stay at chance)."""
    from mmalign.repa.backbones import DiffusionBackbone
    from mmalign.repa.probes import probe_report

    torch.manual_seed(0)
    net = DiffusionBackbone("dit", 16, 3, 4, num_layers=2, patch_size=4, num_attention_heads=2, attention_head_dim=8,
                            norm_num_groups=1)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 2
    colours = torch.tensor([[0.8, -0.8, -0.8], [-0.8, -0.8, 0.8]])  # red vs blue, plus noise
    images = (colours[y][:, :, None, None] + 0.3 * torch.randn(240, 3, 16, 16, generator=g)).clamp(-1, 1)
    shuffled = y[torch.randperm(240, generator=g)]
    train = (images[:160], {"colour": y[:160], "shuffled": shuffled[:160]})
    val = (images[160:], {"colour": y[160:], "shuffled": shuffled[160:]})
    teacher = torch.nn.functional.one_hot(y[160:], 2).float() + 0.01 * torch.randn(80, 2, generator=g)
    rep = probe_report(net, net.hook_module("transformer_blocks.0"), 4, train, val, ts=(0.25,), teacher_val=teacher)
    row = rep["t=0.25"]
    assert row["probe_colour"] == 1.0 and row["probe_shuffled"] < 0.7 and row["cknna"] > 0.2
    # the features are the block's output for x_t under the null class (4), with the seeded noise
    from mmalign.repa.probes import hidden_features

    seen = []
    handle = net.hook_module("transformer_blocks.0").register_forward_hook(lambda m, i, o: seen.append(o.mean(1)))
    x = images[:8]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net(0.5 * x + 0.5 * noise, torch.full((8,), 0.5), torch.full((8,), 4))
    handle.remove()
    torch.testing.assert_close(hidden_features(net, net.hook_module("transformer_blocks.0"), x, 0.5, 4), seen[0])
