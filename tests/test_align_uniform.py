"""The alignment + uniformity loss (Wang and Isola): hand-computed values, a brute-force reference over
pairs, exactness across 2 gloo processes, and the module path (``objective.loss: align_uniform``).

The references below are written out here, pair by pair, never with the code's helpers.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed
from test_distributed_collectives import from_plain, to_plain

from mmalign.losses.align_uniform import AlignUniformLoss

TOL = dict(rtol=1e-10, atol=1e-10)


def test_hand_computed_value_on_three_pairs():
    # f: three unit vectors in 2-D; g: the first text equals the second
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    g = torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    # alignment, alpha 2: only pair 0 differs, ||(1,-1)||^2 = 2  ->  2/3
    # uniformity of f, t 2: squared distances of pairs (0,1), (0,2), (1,2) = 2, 4, 2
    u_f = math.log((math.exp(-4) + math.exp(-8) + math.exp(-4)) / 3)
    # uniformity of g: squared distances 0, 2, 2
    u_g = math.log((1 + math.exp(-4) + math.exp(-4)) / 3)
    want = 2 / 3 + (u_f + u_g) / 2
    assert AlignUniformLoss()(f, g).item() == pytest.approx(want, rel=1e-12)
    # alpha 1 takes the plain distance sqrt(2); weight 0.5 halves the uniformity; t 1 halves the exponents
    u_f1 = math.log((2 * math.exp(-2) + math.exp(-4)) / 3)
    u_g1 = math.log((1 + 2 * math.exp(-2)) / 3)
    want = math.sqrt(2) / 3 + 0.5 * (u_f1 + u_g1) / 2
    assert AlignUniformLoss(alpha=1.0, t=1.0, weight=0.5)(f, g).item() == pytest.approx(want, rel=1e-12)
    # weight 0: alignment only
    assert AlignUniformLoss(weight=0.0)(f, g).item() == pytest.approx(2 / 3, rel=1e-12)


def _reference(f: torch.Tensor, g: torch.Tensor, alpha=2.0, t=2.0, weight=1.0) -> torch.Tensor:
    """Brute force over pairs with python loops: differentiable, independent of the code's formulas."""
    n = f.shape[0]
    align = sum(((f[i] - g[i]) ** 2).sum() ** (alpha / 2) for i in range(n)) / n

    def uniform(x):
        terms = [torch.exp(-t * ((x[i] - x[j]) ** 2).sum()) for i in range(n) for j in range(n) if i != j]
        return torch.log(sum(terms) / len(terms))

    return align + weight * (uniform(f) + uniform(g)) / 2


def _features(n: int, d: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    g = F.normalize(f + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    return f, g


def _loss_and_grads(f, g, fn):
    f, g = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    loss = fn(f, g)
    loss.backward()
    return loss.detach(), f.grad, g.grad


@pytest.mark.parametrize("kw", [{}, {"alpha": 1.5, "t": 3.0, "weight": 0.7}])
def test_matches_brute_force_value_and_gradients(kw):
    f, g = _features(7)
    got = _loss_and_grads(f, g, AlignUniformLoss(**kw))
    ref = _loss_and_grads(f, g, lambda a, b: _reference(a, b, **kw))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_bad_options_and_inputs_are_named():
    with pytest.raises(ValueError, match="t must be > 0"):
        AlignUniformLoss(t=0.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        AlignUniformLoss(alpha=-1.0)
    f, g = _features(1)
    with pytest.raises(ValueError, match="at least 2 image-text pairs"):
        AlignUniformLoss()(f, g)


# ---------------------------------------------------------------- 2 gloo processes


def _worker(rank, world, f_np, g_np, kw):
    f, g = torch.from_numpy(f_np), torch.from_numpy(g_np)
    b = f.shape[0] // world
    rows = slice(rank * b, (rank + 1) * b)
    return to_plain(_loss_and_grads(f[rows], g[rows], AlignUniformLoss(**kw)))


@pytest.mark.distributed
@pytest.mark.parametrize("kw", [{}, {"alpha": 1.0, "t": 5.0, "weight": 2.0}])
def test_two_processes_equal_the_global_batch(kw):
    """mean over ranks of the local losses == the global-batch loss; each rank's feature gradient ==
    2 x the global gradient of its rows (DDP's averaging then makes the step exact)."""
    world = 2
    f, g = _features(world * 3, seed=1)
    out = [from_plain(r) for r in run_distributed(_worker, world, (f.numpy(), g.numpy(), kw))]
    ref_loss, ref_f, ref_g = _loss_and_grads(f, g, lambda a, b: _reference(a, b, **kw))
    torch.testing.assert_close(sum(o[0] for o in out) / world, ref_loss, **TOL)
    for r, (loss, grad_f, grad_g) in enumerate(out):
        rows = slice(r * 3, (r + 1) * 3)
        torch.testing.assert_close(grad_f, world * ref_f[rows], **TOL, msg=f"rank {r} image grad")
        torch.testing.assert_close(grad_g, world * ref_g[rows], **TOL, msg=f"rank {r} text grad")
    # the local-only (per-rank) uniformity differs from the global one: the test above is not trivial
    local = _reference(f[:3], g[:3], **kw)
    assert abs(float(local) - float(ref_loss)) > 1e-3


# ---------------------------------------------------------------- the module path


def test_module_trains_two_steps_with_align_uniform():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from test_contrastive_module import batch, tiny

    from mmalign.contrastive import CLIP

    model = tiny(CLIP, objective={"loss": "align_uniform", "uniform_t": 3.0},
                 optim={"lr": 1e-3, "warmup_steps": 0})
    b = batch(6)
    with torch.no_grad():
        img, txt = model.encode(b["image"], b["tokens"])
        want = _reference(img.double(), txt.double(), t=3.0)
        assert float(model.contrastive_loss(img, txt)) == pytest.approx(float(want), rel=1e-5)
    scale = model.model.logit_scale.detach().clone()
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader([b, b], batch_size=None))
    assert trainer.global_step == 2
    changed = [n for n, p in model.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert "visual.conv1.weight" in changed and "token_embedding.weight" in changed
    assert torch.equal(model.model.logit_scale.detach(), scale)  # no temperature in this loss
    with torch.no_grad():
        after = model.contrastive_loss(*model.encode(b["image"], b["tokens"]))
    assert float(after) < float(want) - 1e-3  # two steps on these batches lowered the loss


def test_objective_spec_refuses_align_options_with_another_loss():
    from mmalign.contrastive.specs import ObjectiveSpec

    with pytest.raises(ValueError, match="objective.uniform_t=3.0 only apply to objective.loss: align_uniform"):
        ObjectiveSpec(loss="clip", uniform_t=3.0)
    with pytest.raises(ValueError, match="objective.tile_size=64 has no align_uniform version"):
        ObjectiveSpec(loss="align_uniform", tile_size=64)
    with pytest.raises(ValueError, match="objective.uniform_t must be > 0"):
        ObjectiveSpec(loss="align_uniform", uniform_t=0.0)
    with pytest.raises(ValueError, match="objective.label_smoothing=0.1 only applies to objective.loss: clip"):
        ObjectiveSpec(loss="align_uniform", label_smoothing=0.1)
    # a null loss resolves to the class's default first, and the check runs again then
    from mmalign.contrastive import SigLIP
    from test_contrastive_module import tiny

    with pytest.raises(ValueError, match="objective.uniform_t=3.0 only apply to objective.loss: align_uniform, "
                                         "but the loss is 'siglip'"):
        tiny(SigLIP, objective={"uniform_t": 3.0})
