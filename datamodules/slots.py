"""Stream-slot arithmetic: who reads which shard, how many batches each rank and worker takes.

A training stream is read by ``world_size x num_workers`` independent readers ("slots"). This module
is the one place that decides how shards are dealt to slots and how an epoch's batches are split
among them, so the guarantees the stream makes (disjoint shards per rank, equal batch counts on
every rank, exact mid-epoch resume) rest on a few small functions with their own tests.

It sits in the data layer: rank discovery reads the initialised process group or the launcher's
environment; no collective is called here (those live in ``mmalign.distributed``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
