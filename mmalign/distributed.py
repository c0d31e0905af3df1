"""Every piece of distributed arithmetic in mmalign lives here.

Rank discovery, the stream-slot arithmetic the data layer deals shards and batches with (who reads
which shard, how many batches each rank and worker takes), and the collectives the losses, metrics
and callbacks use (gathers that carry gradients, ring exchange, object gathers). Nothing else in the
project calls ``torch.distributed`` directly, so all of it is covered by the multi-process gloo tests.

Plain torch: it imports neither Lightning nor the data layer (``datamodules`` imports it, not the
reverse; the layer test checks both).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


# ---- rank discovery and stream slots ----
#
# A training stream is read by ``world_size x num_workers`` independent readers ("slots"). The
# functions below decide how shards are dealt to slots and how an epoch's batches are split among
# them, so the guarantees the stream makes (disjoint shards per rank, equal batch counts on every
# rank, exact mid-epoch resume) rest on a few small functions with their own tests.


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


@dataclass(frozen=True)
class StreamSlot:
    """Which reader this process/worker is among all readers of a stream.

    Slot ids are rank-major, so the shards of one rank are contiguous in the slot order.
    """

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def current_slot(rank: int | None = None, world_size: int | None = None) -> StreamSlot:
    """The slot of the caller, looked up inside a DataLoader worker if there is one.

    Rank and world size come from the initialised process group, else from the launcher's
    environment (RANK/WORLD_SIZE, set by torchrun and by Lightning before the group exists),
    unless given explicitly.
    """
    if rank is None:
        rank = get_rank() if is_dist() else int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return StreamSlot(rank, world_size, worker, num_workers)


def assign_shards(sizes: Sequence[int | None], slot: StreamSlot) -> list[int]:
    """Positions (into ``sizes``) of the shards ``slot`` reads.

    With every size known, shards are dealt greedily to the reader holding the fewest samples so
    far (ties to the lowest slot), in the given order: readers end up with near-equal sample counts,
    so none has to re-read its shards while another leaves half of its own unread (with plain
    round-robin over very uneven shards, half the data went unseen per epoch). Without sizes it
    falls back to round-robin. The result depends only on ``sizes`` and the slot count, so every
    rank computes the same disjoint assignment.
    """
    if any(s is None for s in sizes):
        return list(range(slot.index, len(sizes), slot.count))
    load = [0] * slot.count
    mine = []
    for pos, size in enumerate(sizes):
        reader = min(range(slot.count), key=lambda r: (load[r], r))
        load[reader] += int(size) or 1  # an empty shard still costs a reader one open
        if reader == slot.index:
            mine.append(pos)
    return mine


def batches_per_rank(total_samples: int, world_size: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches every rank takes in one epoch, identical on all ranks so DDP never waits forever.

    With ``drop_last`` the last partial global batch is dropped (training); without it, it is
    rounded up and the ranks that run short repeat samples of their own shards.
    """
    per_rank = total_samples / (world_size * batch_size)
    return int(per_rank) if drop_last else math.ceil(per_rank)


def split_evenly(total: int, parts: int, index: int) -> int:
    """Size of part ``index`` when ``total`` items are split into ``parts`` near-equal parts
    (the first ``total % parts`` parts get one more)."""
    return total // parts + (1 if index < total % parts else 0)


def worker_share(consumed: int, num_workers: int, worker: int) -> int:
    """How many of a rank's first ``consumed`` batches came from ``worker``.

    A DataLoader over an iterable dataset asks its workers in turn and returns their batches in
    that order; since worker quotas come from ``split_evenly`` (earlier workers hold the extra
    batch), batch ``k`` of an epoch is always worker ``k % num_workers``'s. This is what lets a
    checkpoint name each worker's position from the one count Lightning keeps.
    """
    return len(range(worker, consumed, max(1, num_workers)))


# ---- collectives ----

def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks (no gradient); the identity in a single process."""
    if is_dist():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_object(obj):
    """List of ``obj`` from every rank (pickled; for small metadata only)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- collectives used by the losses ----
#
# Gradient convention (what every loss in mmalign relies on): each rank computes a *local* loss
# L_r on its own rows against the global batch, and DDP averages parameter gradients over ranks,
# so the optimizer sees d/dθ of (1/W) Σ_r L_r. For that to be the gradient of the global-batch
# loss, the backward of a gather must hand every rank Σ_s ∂L_s/∂x_r (the SUM over ranks of the
# gradient for its own slice), not just its own ∂L_r/∂x_r: that is reduce-scatter semantics.

# The single-tensor collectives were renamed (``*_tensor`` -> ``*_single``); use whichever exists so
# the module works across the supported torch range without deprecation noise.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def all_gather_ints(values: list[int] | tuple[int, ...], device: torch.device | str = "cpu") -> list[list[int]]:
    """``values`` from every rank, as one list per rank (a tiny tensor collective, no pickling).

    Used to check that ranks agree (batch sizes, feature widths, NaN flags) before a gather or a
    ring exchange, which would otherwise fail with an opaque size error or hang. ``device`` must
    be one the backend can communicate on (CUDA for NCCL).
    """
    local = torch.tensor(list(values), dtype=torch.long, device=device)
    if not is_dist():
        return [local.tolist()]
    out = torch.empty(get_world_size() * local.numel(), dtype=torch.long, device=device)
    _all_gather_single(out, local)
    return out.view(get_world_size(), -1).tolist()


_MAX_CHECKED_DIMS = 8


def check_same_shape(x: torch.Tensor, name: str = "tensor") -> None:
    """Raise on every rank (not just the odd one out) if ``x`` has a different shape on some rank."""
    if not is_dist():
        return
    if x.dim() > _MAX_CHECKED_DIMS:
        raise ValueError(f"{name}: shape checks support at most {_MAX_CHECKED_DIMS} dims, got {x.dim()}")
    # Fixed length so the all-gather itself cannot fail on ranks that disagree about x.dim().
    shapes = all_gather_ints([x.dim(), *x.shape] + [0] * (_MAX_CHECKED_DIMS - x.dim()), device=x.device)
    if any(s != shapes[0] for s in shapes):
        per_rank = {r: tuple(s[1 : 1 + s[0]]) for r, s in enumerate(shapes)}
        raise ValueError(
            f"{name} must have the same shape on every rank for a gather/exchange, got {per_rank} "
            "(rank: shape). Use drop_last=True or equal per-rank batch sizes."
        )


def _gather_dim0(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()  # the collectives read raw memory; a transposed view would be scrambled
    out = x.new_empty((get_world_size() * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _gather_dim0(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Reduce-scatter: sum over ranks of the gradient of the full gathered tensor, keep own rows.
        # Returning only grad[own rows] (no sum) is the bug that silently drops the gradient every
        # other rank's loss puts on this rank's features.
        grad = grad.contiguous()
        out = grad.new_empty((ctx.rows, *grad.shape[1:]))
        _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM)
        return out


def all_gather_with_grad(x: torch.Tensor, check_sizes: bool = True) -> torch.Tensor:
    """Concatenation of ``x`` over ranks along dim 0 (rank-major), differentiable.

    Backward gives each rank the SUM over ranks of the gradient for its own slice, which together
    with DDP gradient averaging makes a per-rank "local loss" exact (see the section comment).
    All ranks must pass the same shape; ``check_sizes`` verifies it with one tiny extra collective
    and raises a clear error on every rank (pass False if the caller already checked). In a single
    process this is the identity (the same tensor object, so gradients flow unchanged).
    """
    if not is_dist() or get_world_size() == 1:
        return x
    if check_sizes:
        check_same_shape(x, "all_gather_with_grad input")
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor, check_sizes: bool = True) -> torch.Tensor:
    """Concatenation of ``x`` over ranks along dim 0, detached (for metrics, caches, baselines)."""
    if not is_dist() or get_world_size() == 1:
        return x.detach()
    if check_sizes:
        check_same_shape(x, "all_gather_no_grad input")
    with torch.no_grad():
        return _gather_dim0(x.detach())


# Tags keep the two directions of a bidirectional exchange apart when left == right (W = 2) on
# backends that match messages by tag (gloo). The op order below also matches them on backends that
# ignore tags (NCCL): a peer's sends [to its left, to its right] meet our receives [from our right,
# from our left] in the same order.
_TAG_LEFTWARD, _TAG_RIGHTWARD = 17, 18


def _p2p(sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]]) -> None:
    """Post all sends then all receives as one batch and wait; entries are (tensor, peer, tag)."""
    ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer, tag in recvs]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def _neighbours() -> tuple[int, int]:
    rank, world = get_rank(), get_world_size()
    return (rank - 1) % world, (rank + 1) % world


class _ShiftWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send_to: int, recv_from: int, tag: int) -> torch.Tensor:
        ctx.send_to, ctx.recv_from, ctx.tag = send_to, recv_from, tag
        x = x.contiguous()
        out = torch.empty_like(x)
        _p2p([(x, send_to, tag)], [(out, recv_from, tag)])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The gradient of what we received belongs to the rank that sent it: run the shift backwards.
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        _p2p([(grad, ctx.recv_from, ctx.tag)], [(out, ctx.send_to, ctx.tag)])
        return out, None, None, None


def _ring_route(direction: int) -> tuple[int, int, int] | None:
    """(send_to, recv_from, tag) of a one-step ring shift in ``direction``; None in a single process."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 (to the right) or -1 (to the left), got {direction!r}")
    if not is_dist() or get_world_size() == 1:
        return None
    left, right = _neighbours()
    if direction == 1:
        return right, left, _TAG_RIGHTWARD
    return left, right, _TAG_LEFTWARD


def ring_shift_with_grad(x: torch.Tensor, direction: int = 1) -> torch.Tensor:
    """Send ``x`` one step around the ring and receive the neighbour's block, differentiably.

    ``direction=+1`` sends to rank+1 and receives from rank-1 (``-1`` the reverse). Backward sends
    the gradient of the received block back to the rank it came from. Every rank must call it with
    the same shape and direction; in a single process it returns ``x``.
    """
    route = _ring_route(direction)
    return x if route is None else _ShiftWithGrad.apply(x, *route)


def ring_shift_no_grad(x: torch.Tensor, direction: int = 1) -> torch.Tensor:
    """Send ``x`` one step around the ring and receive the neighbour's block, outside autograd.

    For losses that run the ring inside their own ``autograd.Function`` (``losses.tiled``): there
    the backward re-runs the ring itself, so the shift must not record a graph that would keep
    every received block alive. ``direction`` as in :func:`ring_shift_with_grad`; every rank must
    call it with the same shape and direction; in a single process it returns ``x``.
    """
    route = _ring_route(direction)
    if route is None:
        return x
    send_to, recv_from, tag = route
    with torch.no_grad():
        x = x.detach().contiguous()
        out = torch.empty_like(x)
        _p2p([(x, send_to, tag)], [(out, recv_from, tag)])
    return out


class _BidirWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, to_left: torch.Tensor, to_right: torch.Tensor):
        left, right = _neighbours()
        ctx.left, ctx.right = left, right
        to_left, to_right = to_left.contiguous(), to_right.contiguous()
        from_right, from_left = torch.empty_like(to_left), torch.empty_like(to_right)
        _p2p(
            [(to_left, left, _TAG_LEFTWARD), (to_right, right, _TAG_RIGHTWARD)],
            [(from_right, right, _TAG_LEFTWARD), (from_left, left, _TAG_RIGHTWARD)],
        )
        return from_right, from_left

    @staticmethod
    def backward(ctx, grad_from_right: torch.Tensor, grad_from_left: torch.Tensor):
        # Reverse every arrow: the right neighbour sent us from_right, so its gradient goes back right
        # (travelling leftward from its point of view, hence the swapped tags); what we sent left comes
        # back from the left as the gradient of to_left.
        grad_from_right, grad_from_left = grad_from_right.contiguous(), grad_from_left.contiguous()
        grad_to_left, grad_to_right = torch.empty_like(grad_from_right), torch.empty_like(grad_from_left)
        _p2p(
            [(grad_from_right, ctx.right, _TAG_RIGHTWARD), (grad_from_left, ctx.left, _TAG_LEFTWARD)],
            [(grad_to_left, ctx.left, _TAG_RIGHTWARD), (grad_to_right, ctx.right, _TAG_LEFTWARD)],
        )
        return grad_to_left, grad_to_right


def ring_exchange_bidir_with_grad(
    to_left: torch.Tensor, to_right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One bidirectional ring step: send ``to_left`` to rank-1 and ``to_right`` to rank+1.

    Returns ``(from_right, from_left)``: what rank+1 sent leftward and what rank-1 sent rightward.
    Differentiable: backward returns each received block's gradient to the rank that sent it. Both
    tensors must have the same shape on every rank (they are received into buffers shaped like the
    local ones). In a single process the ring is one rank that is its own neighbour both ways, so it
    returns ``(to_left, to_right)``.
    """
    if to_left.shape != to_right.shape:
        raise ValueError(f"to_left and to_right must have the same shape, got {tuple(to_left.shape)} "
                         f"and {tuple(to_right.shape)}")
    if not is_dist() or get_world_size() == 1:
        return to_left, to_right
    return _BidirWithGrad.apply(to_left, to_right)


def average_gradients_(params) -> None:
    """Average ``.grad`` of ``params`` over ranks in place (one flat all-reduce), as DDP would.

    For manual gradient accumulation that bypasses DDP's hooks (the feature-cache path)."""
    if not is_dist():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def fully_shard_blocks(model: torch.nn.Module, blocks, mesh) -> None:
    """FSDP2: shard each block (its own all-gather/free unit), then the remaining root parameters.

    Scalar parameters (CLIP's logit scale, SigLIP's bias) cannot be sharded (``fully_shard`` refuses
    0-d tensors): they stay replicated and a gradient hook averages them over the data-parallel
    group, which is what DDP would do. Used by ``configure_model`` under Lightning's
    ModelParallelStrategy (which supplies ``mesh``) and tested with gloo on CPU.
    """
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, ignored_params=scalars or None)
    fully_shard(model, mesh=dp_mesh, ignored_params=scalars or None)
    group = dp_mesh.get_group()
    world = dist.get_world_size(group)
    for p in scalars:
        if p.requires_grad:
            p.register_hook(lambda g, group=group, world=world: _averaged(g, group, world))


def _averaged(grad: torch.Tensor, group, world: int) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    return grad / world
