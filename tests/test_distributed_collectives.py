"""The collectives the losses rely on: values and, above all, where their gradients go.

Multi-process cases run in one spawn per world size (spawning costs seconds); each rank returns what
it saw and the parent asserts, so a failure names the rank and the quantity.
"""

import pytest
import torch
from _dist import run_distributed

from mmalign.distributed import (
    all_gather_ints,
    all_gather_no_grad,
    all_gather_with_grad,
    check_same_shape,
    ring_exchange_bidir_with_grad,
    ring_shift_with_grad,
)

B, D = 2, 3


def to_plain(obj):
    """Tensors -> numpy, recursively. Tensors put on the result queue are shared through file
    descriptors that die with the worker process ("connection reset by peer"); numpy pickles by value."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().numpy()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def from_plain(obj):
    if hasattr(obj, "__array__") and not isinstance(obj, (bool, int, float)):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_plain(v) for v in obj)
    return obj


def _block(rank: int) -> torch.Tensor:
    """A distinct, recognisable [B, D] block per rank."""
    return torch.arange(B * D, dtype=torch.float64).view(B, D) + 100.0 * rank


def _weight(rank: int, rows: int) -> torch.Tensor:
    """Rank-specific loss weights so every rank's gradient contribution is distinguishable."""
    return torch.linspace(1.0, 2.0, rows * D, dtype=torch.float64).view(rows, D) * (rank + 1) ** 2


def _collectives_worker(rank: int, world: int) -> dict:
    out = {}
    # all_gather_with_grad: forward is the rank-major concatenation, backward the reduce-scatter sum.
    x = _block(rank).requires_grad_(True)
    gathered = all_gather_with_grad(x)
    out["gathered"] = gathered.detach()
    (gathered * _weight(rank, world * B)).sum().backward()
    out["gather_grad"] = x.grad

    nograd = all_gather_no_grad(_block(rank).requires_grad_(True))
    out["nograd"] = (nograd.detach(), nograd.requires_grad)
    out["ints"] = all_gather_ints([rank, 7 * rank])

    # Unequal batch sizes: every rank must raise the same clear error (none may hang).
    try:
        all_gather_with_grad(torch.zeros(B + rank, D))
        out["size_error"] = None
    except ValueError as e:
        out["size_error"] = str(e)
    try:
        check_same_shape(torch.zeros(B, D + rank), "feats")
        out["shape_error"] = None
    except ValueError as e:
        out["shape_error"] = str(e)

    # One-way shift to the right: receive the left block; its gradient must go back left.
    for direction in (1, -1):
        y = _block(rank).requires_grad_(True)
        received = ring_shift_with_grad(y, direction=direction)
        (received * _weight(rank, B)).sum().backward()
        out[f"shift{direction}"] = (received.detach(), y.grad)

    # Bidirectional step with different payloads each way (tags must keep them apart when W = 2).
    a = _block(rank).requires_grad_(True)
    b = (-_block(rank)).requires_grad_(True)
    from_right, from_left = ring_exchange_bidir_with_grad(a, b)
    ((from_right * _weight(rank, B)).sum() + (from_left * 10 * _weight(rank, B)).sum()).backward()
    out["bidir"] = (from_right.detach(), from_left.detach(), a.grad, b.grad)
    return to_plain(out)


def _check_collectives(world: int) -> None:
    results = [from_plain(r) for r in run_distributed(_collectives_worker, world_size=world)]
    full = torch.cat([_block(r) for r in range(world)])
    for rank, res in enumerate(results):
        left, right = (rank - 1) % world, (rank + 1) % world
        torch.testing.assert_close(res["gathered"], full, rtol=0, atol=0)
        # d/dx_r of sum_s <w_s, gather> = sum_s w_s[rows of r]: the SUM over ranks, not w_r alone.
        expected = sum(_weight(s, world * B) for s in range(world))[rank * B : (rank + 1) * B]
        torch.testing.assert_close(res["gather_grad"], expected, rtol=0, atol=1e-12)
        assert not torch.allclose(res["gather_grad"], _weight(rank, world * B)[rank * B : (rank + 1) * B])
        torch.testing.assert_close(res["nograd"][0], full, rtol=0, atol=0)
        assert res["nograd"][1] is False
        assert res["ints"] == [[r, 7 * r] for r in range(world)]
        assert "same shape on every rank" in res["size_error"]
        assert f"{world - 1}: ({B + world - 1}, {D})" in res["size_error"]
        assert "feats must have the same shape" in res["shape_error"]

        received, grad = res["shift1"]  # rank r sent to r+1 and got r-1's block
        torch.testing.assert_close(received, _block(left), rtol=0, atol=0)
        torch.testing.assert_close(grad, _weight(right, B), rtol=0, atol=0)  # gradient came back from r+1
        received, grad = res["shift-1"]
        torch.testing.assert_close(received, _block(right), rtol=0, atol=0)
        torch.testing.assert_close(grad, _weight(left, B), rtol=0, atol=0)

        from_right, from_left, grad_a, grad_b = res["bidir"]
        torch.testing.assert_close(from_right, _block(right), rtol=0, atol=0)  # right's "to_left"
        torch.testing.assert_close(from_left, -_block(left), rtol=0, atol=0)  # left's "to_right"
        # a went left, where it was that rank's from_right (weight w); b went right (weight 10 w).
        torch.testing.assert_close(grad_a, _weight(left, B), rtol=0, atol=0)
        torch.testing.assert_close(grad_b, 10 * _weight(right, B), rtol=0, atol=0)


@pytest.mark.distributed
def test_collectives_two_processes():
    _check_collectives(2)


@pytest.mark.distributed
def test_collectives_three_processes():
    _check_collectives(3)


def test_collectives_are_identities_in_one_process():
    x = torch.randn(B, D, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert ring_shift_with_grad(x) is x
    assert ring_exchange_bidir_with_grad(x, x) == (x, x)
    assert all_gather_no_grad(x).requires_grad is False
    assert all_gather_ints([1, 2]) == [[1, 2]]
    check_same_shape(x)  # nothing to compare against: no error


def test_argument_errors():
    with pytest.raises(ValueError, match="direction must be"):
        ring_shift_with_grad(torch.zeros(2, 2), direction=2)
    with pytest.raises(ValueError, match="same shape"):
        ring_exchange_bidir_with_grad(torch.zeros(2, 2), torch.zeros(3, 2))
