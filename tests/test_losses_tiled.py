"""Tiled CLIP/SigLIP (``mmalign.losses.tiled``) against the untiled losses on the global batch.

Same scaling convention as ``test_losses_contrastive.py`` (W ranks, N = W * B): the mean of the
local losses is the global loss, the gradient on rank r's features is W times the global gradient
of those rows, and the scale/bias gradients average over ranks to the global gradient. Tile sizes
that do not divide B (and tiles that straddle rank boundaries in the columns) are the point.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed
from test_distributed_collectives import from_plain, to_plain

from mmalign.losses.contrastive import ClipLoss, SigLipLoss

TOL64 = dict(rtol=1e-10, atol=1e-10)
TOL32 = dict(rtol=1e-5, atol=1e-5)
SCALE, BIAS = 7.5, -2.0
B_RANK, TILE_RANK = 5, 3  # multi-process: 5 rows per rank in tiles of 3 (column tiles cross ranks)

# name -> (untiled factory, tiled factory, takes a bias)
CASES = {
    "clip": (lambda: ClipLoss(), lambda t: ClipLoss(tile_size=t), False),
    "clip_smooth": (lambda: ClipLoss(label_smoothing=0.1), lambda t: ClipLoss(label_smoothing=0.1, tile_size=t), False),
    "siglip_ring": (lambda: SigLipLoss(), lambda t: SigLipLoss(exchange="ring", tile_size=t), True),
    "siglip_gather": (lambda: SigLipLoss(), lambda t: SigLipLoss(exchange="gather", tile_size=t), True),
}


def _features(n: int, d: int = 6, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return img.to(dtype), txt.to(dtype)


def _value_and_grads(loss_fn, img, txt, with_bias: bool, weight: float = 1.0) -> dict:
    """Loss and gradients w.r.t. both features, the log scale and the bias (``weight`` scales the loss)."""
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(SCALE), dtype=img.dtype, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=img.dtype, requires_grad=True)
    loss = loss_fn(img, txt, log_scale.exp(), bias) if with_bias else loss_fn(img, txt, log_scale.exp())
    (weight * loss).backward()
    return dict(loss=loss.detach(), img=img.grad, txt=txt.grad, scale=log_scale.grad,
                bias=bias.grad if with_bias else torch.zeros((), dtype=img.dtype))


def _assert_same(got: dict, ref: dict, tol: dict, what: str) -> None:
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], **tol, msg=f"{what}: {key}")


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("tile", [1, 4, 13, 64])  # one row per tile, not dividing B, exactly B, larger than B
@pytest.mark.parametrize("name", ["clip", "clip_smooth", "siglip_ring"])
def test_tiled_equals_untiled_float64(name, tile):
    untiled, tiled, with_bias = CASES[name]
    img, txt = _features(13)
    ref = _value_and_grads(untiled(), img, txt, with_bias)
    _assert_same(_value_and_grads(tiled(tile), img, txt, with_bias), ref, TOL64, f"{name} tile {tile}")


@pytest.mark.parametrize("name", ["clip", "clip_smooth", "siglip_ring"])
def test_tiled_equals_untiled_float32(name):
    untiled, tiled, with_bias = CASES[name]
    img, txt = _features(300, d=32, dtype=torch.float32)
    ref = _value_and_grads(untiled(), img, txt, with_bias)
    _assert_same(_value_and_grads(tiled(64), img, txt, with_bias), ref, TOL32, name)


def test_label_smoothing_changes_loss_and_gradients():
    # Guards against the tiled path silently ignoring eps: smoothing must move loss and gradients.
    img, txt = _features(9)
    plain = _value_and_grads(ClipLoss(tile_size=4), img, txt, False)
    smooth = _value_and_grads(ClipLoss(label_smoothing=0.3, tile_size=4), img, txt, False)
    assert abs(float(plain["loss"] - smooth["loss"])) > 1e-3
    assert (plain["img"] - smooth["img"]).abs().max() > 1e-4
    _assert_same(smooth, _value_and_grads(ClipLoss(label_smoothing=0.3), img, txt, False), TOL64, "eps 0.3")


def test_float_scale_and_bias_and_local_only():
    img, txt = _features(7)
    for untiled, tiled, extra in ((ClipLoss(), ClipLoss(tile_size=3), ()), (SigLipLoss(), SigLipLoss(tile_size=3), (BIAS,))):
        torch.testing.assert_close(tiled(img, txt, SCALE, *extra), untiled(img, txt, SCALE, *extra), **TOL64)
        torch.testing.assert_close(tiled(img, txt, SCALE, *extra, local_only=True), untiled(img, txt, SCALE, *extra),
                                   **TOL64)


def test_bfloat16_features_compute_in_float32():
    img, txt = _features(20, d=8, dtype=torch.bfloat16)
    for untiled, tiled, with_bias in (CASES["clip"], CASES["siglip_ring"]):
        got = _value_and_grads(tiled(6), img, txt, with_bias)
        ref = _value_and_grads(untiled(), img.float(), txt.float(), with_bias)
        assert got["img"].dtype == torch.bfloat16 and got["scale"].dtype == torch.bfloat16
        _assert_same({k: v.float() for k, v in got.items()}, ref, dict(rtol=2e-2, atol=2e-2), "bf16")


def test_tile_size_errors():
    for bad in (0, -3, 2.5, True, "256"):
        for cls in (ClipLoss, SigLipLoss):
            with pytest.raises(ValueError, match="tile_size must be a positive int"):
                cls(tile_size=bad)
    with pytest.raises(ValueError, match="gather_with_grad=True"):
        ClipLoss(gather_with_grad=False, tile_size=8)
    img, txt = _features(4)
    with pytest.raises(ValueError, match="return_logits=True needs the B x N logits"):
        ClipLoss(tile_size=2)(img, txt, SCALE, return_logits=True)


def _saved_bytes(loss_fn, n: int, with_bias: bool, d: int = 16) -> int:
    """Bytes of distinct storages autograd keeps for backward over one loss call."""
    img, txt = _features(n, d=d, dtype=torch.float32)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(SCALE, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(img, txt, scale, torch.tensor(BIAS)) if with_bias else loss_fn(img, txt, scale)
    loss.backward()  # the graph must still be complete
    return sum(storages.values())


@pytest.mark.parametrize("name", ["clip", "siglip_ring"])
def test_memory_kept_for_backward_is_linear_in_the_batch(name):
    untiled, tiled, with_bias = CASES[name]
    small, large = (_saved_bytes(tiled(256), n, with_bias) for n in (1024, 4096))
    big_untiled = _saved_bytes(untiled(), 4096, with_bias)
    assert big_untiled > 4096 * 4096 * 4  # the untiled loss keeps at least one N x N float32 matrix
    assert large <= 4.5 * small, (small, large)  # 4x the batch: ~4x the bytes (quadratic would be 16x)
    assert large * 100 < big_untiled, (large, big_untiled)


# ---------------------------------------------------------------- multi-process


def _tiled_worker(rank: int, world: int, img_np, txt_np) -> dict:
    img_all, txt_all = torch.from_numpy(img_np), torch.from_numpy(txt_np)
    rows = slice(rank * B_RANK, (rank + 1) * B_RANK)
    img, txt = img_all[rows], txt_all[rows]
    out = {}
    for name, (untiled, tiled, with_bias) in CASES.items():
        out[name] = _value_and_grads(tiled(TILE_RANK), img, txt, with_bias)
        # Per-rank loss weights: the tiled CLIP weights the other ranks' text columns by *their*
        # upstream gradient, so it must match the untiled distributed loss rank by rank.
        out[name + "_weighted"] = _value_and_grads(tiled(TILE_RANK), img, txt, with_bias, weight=1.0 + rank)
        out[name + "_weighted_ref"] = _value_and_grads(untiled(), img, txt, with_bias, weight=1.0 + rank)
    return to_plain(out)


def _check_distributed(world: int) -> None:
    img, txt = _features(world * B_RANK)
    results = [from_plain(r) for r in run_distributed(_tiled_worker, world_size=world, args=(img.numpy(), txt.numpy()))]
    for name, (untiled, _, with_bias) in CASES.items():
        ref = _value_and_grads(untiled(), img, txt, with_bias)
        per_rank = [r[name] for r in results]
        torch.testing.assert_close(sum(r["loss"] for r in per_rank) / world, ref["loss"], **TOL64,
                                   msg=f"{name}: mean of local losses")
        for r, res in enumerate(per_rank):
            rows = slice(r * B_RANK, (r + 1) * B_RANK)
            for key in ("img", "txt"):
                torch.testing.assert_close(res[key], world * ref[key][rows], **TOL64, msg=f"{name} rank {r} {key}")
        for key in ("scale", "bias"):
            torch.testing.assert_close(sum(r[key] for r in per_rank) / world, ref[key], **TOL64,
                                       msg=f"{name}: mean {key} grad")
        for r, res in enumerate(results):
            got, want = res[name + "_weighted"], res[name + "_weighted_ref"]
            for key in ("loss", "img", "txt"):
                torch.testing.assert_close(got[key], want[key], **TOL64, msg=f"{name} weighted rank {r} {key}")
        for key in ("scale", "bias"):
            torch.testing.assert_close(sum(r[name + "_weighted"][key] for r in results),
                                       sum(r[name + "_weighted_ref"][key] for r in results), **TOL64,
                                       msg=f"{name} weighted: summed {key} grad")


@pytest.mark.distributed
def test_distributed_two_processes():
    _check_distributed(2)


@pytest.mark.distributed
def test_distributed_three_processes():
    _check_distributed(3)


@pytest.mark.distributed
def test_distributed_four_processes():
    _check_distributed(4)


# ---------------------------------------------------------------- the Lightning module wiring


def test_contrastive_module_builds_the_tiled_loss():
    from test_contrastive_module import tiny

    from mmalign.contrastive import CLIP, SigLIP

    assert tiny(CLIP, objective={"tile_size": 8}).loss_fn.tile_size == 8
    assert tiny(SigLIP, objective={"tile_size": 8}).loss_fn.tile_size == 8
    assert tiny(CLIP).loss_fn.tile_size is None
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="objective.tile_size must be a positive int"):
            tiny(CLIP, objective={"tile_size": bad})
