"""The streaming core: shards -> samples -> decoded, shuffled batches, split by rank and worker.

Guarantees (tested with 2 gloo processes):
- every rank reads a disjoint set of shards (without ``resampled``), so no sample is seen twice
  in one pass across ranks;
- every rank yields exactly ``batches_per_rank`` batches per epoch, whatever the shard sizes:
  a reader that runs dry starts its own shards again (re-shuffled), one with more data stops
  early. Equal batch counts are what keep DDP's all-reduce from waiting forever;
- samples that fail to decode are skipped, counted and their reasons passed along with the next
  batch (keys ``__skipped__``/``__skip_reasons__``), for ``DataHealthMonitor`` to report.

Batches are assembled inside the workers (DataLoader ``batch_size=None``), which is what makes
the per-worker batch quota exact.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from mmalign.distributed import StreamSlot, assign_shards, current_slot, split_evenly

from .shards import ShardError, iter_tar_samples

SKIPPED = "__skipped__"
SKIP_REASONS = "__skip_reasons__"
EMPTY = "__empty__"
MAX_REASONS = 5


_PASS_END = object()  # marks the end of one pass over a reader's shards


class DataConfigError(ValueError):
    """The data contradicts the configuration (e.g. a label >= num_classes). Never skipped."""


def _decode_or_reason(decode: Callable[[dict], dict], raw: dict) -> tuple[dict | None, str | None]:
    try:
        return decode(raw), None
    except DataConfigError:
        raise
    except Exception as exc:  # a corrupt payload: any decoder error means "skip this sample"
        return None, f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}: {type(exc).__name__}: {exc}"


def _with_skips(batch: dict, skipped: int, reasons: list[str]) -> dict:
    batch[SKIPPED] = skipped
    batch[SKIP_REASONS] = reasons[:MAX_REASONS]
    return batch


class StreamingDataset(IterableDataset):
    """Endless-per-epoch stream cut to exactly ``batches_per_rank`` batches on every rank."""

    def __init__(
        self,
        urls: Sequence[str],
        decode: Callable[[dict], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        batches_per_rank: int,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.urls = list(urls)
        self.decode, self.collate = decode, collate
        self.batch_size, self.batches_per_rank = batch_size, batches_per_rank
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.resampled = resampled
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_rank

    def _shard_order(self, slot: StreamSlot, rng: random.Random) -> Iterator[str]:
        if self.resampled:
            while True:  # sampling shards with replacement: no per-rank disjointness, by design
                yield rng.choice(self.urls)
        # The same permutation on every rank (seeded by epoch only) keeps the assignment disjoint
        # while still moving shards between ranks from one epoch to the next.
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}-perm").shuffle(order)
        mine = [self.urls[order[i]] for i in assign_shards(len(order), slot)]
        if not mine:
            raise ShardError(f"reader {slot} got no shard: {len(self.urls)} shards for {slot.count} "
                             "readers. Use fewer workers, more shards, or resampled: true.")
        while True:
            if self.shuffle:
                rng.shuffle(mine)
            yield from mine
            yield None  # pass boundary

    def _samples(self, slot: StreamSlot, rng: random.Random, stats: dict) -> Iterator[dict]:
        decoded_since_restart, shards_since_restart = 0, 0
        for url in self._shard_order(slot, rng):
            if url is None:
                yield _PASS_END
                continue
            errors: list[str] = []
            for raw in iter_tar_samples(url, errors):
                sample, reason = _decode_or_reason(self.decode, raw)
                if sample is None:
                    stats["skipped"] += 1
                    stats["reasons"].append(reason)
                    continue
                decoded_since_restart += 1
                yield sample
            for err in errors:
                stats["skipped"] += 1
                stats["reasons"].append(err)
            shards_since_restart += 1
            if shards_since_restart >= len(self.urls) + 1:
                if decoded_since_restart == 0:
                    raise ShardError(f"reader {slot}: its shards produced no decodable sample "
                                     f"(last reasons: {stats['reasons'][-3:]}). Check the shards.")
                decoded_since_restart, shards_since_restart = 0, 0

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        # The buffer drains at every pass boundary: a buffer larger than a reader's data must not
        # fill up with repeats of it (and re-count its corrupt samples) before yielding anything.
        buf: list[dict] = []
        for s in samples:
            if s is _PASS_END:
                rng.shuffle(buf)
                yield from buf
                buf = []
                continue
            if not self.shuffle or self.shuffle_buffer <= 1:
                yield s
                continue
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        slot = current_slot(self.rank, self.world_size)
        quota = split_evenly(self.batches_per_rank, slot.num_workers, slot.worker)
        if quota == 0:
            return
        rng = random.Random(f"{self.seed}-{self.epoch}-{slot.index}")
        stats: dict[str, Any] = {"skipped": 0, "reasons": []}
        batch: list[dict] = []
        produced = 0
        for sample in self._shuffled(self._samples(slot, rng, stats), rng):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield _with_skips(self.collate(batch), stats["skipped"], stats["reasons"])
                stats["skipped"], stats["reasons"] = 0, []  # in place: _samples holds this dict
                batch = []
                produced += 1
                if produced == quota:
                    return


class SkippedSample:
    """Placeholder returned by the in-memory dataset for a sample that failed to decode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class InMemoryDataset(Dataset):
    """Small evaluation sets: raw (still encoded) samples held in memory, decoded on access.

    Every sample is seen exactly once per pass, which streaming with equal batch counts cannot
    promise; fine for validation/test sets up to a few 100k small samples.
    """

    def __init__(self, urls: Sequence[str], decode: Callable[[dict], dict], max_samples: int | None = None):
        self.decode = decode
        self.raw: list[dict] = []
        self.load_errors: list[str] = []
        for url in urls:
            for raw in iter_tar_samples(url, self.load_errors):
                self.raw.append(raw)
                if max_samples is not None and len(self.raw) >= max_samples:
                    return

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> dict | SkippedSample:
        sample, reason = _decode_or_reason(self.decode, self.raw[i])
        return SkippedSample(reason) if sample is None else sample


class EvalCollate:
    """Collate that drops and counts ``SkippedSample``s; a batch of only bad samples is marked empty."""

    def __init__(self, collate: Callable[[list[dict]], dict]) -> None:
        self.collate = collate

    def __call__(self, items: list) -> dict:
        good = [x for x in items if not isinstance(x, SkippedSample)]
        reasons = [x.reason for x in items if isinstance(x, SkippedSample)]
        batch = self.collate(good) if good else {EMPTY: True}
        return _with_skips(batch, len(reasons), reasons)


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r takes indices r, r+W, ...: no padding, so no sample is counted twice by a metric.

    Ranks may get one batch fewer than others; evaluation metrics only synchronise at ``compute``
    (all ranks reach it), so uneven evaluation batch counts are safe.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_samples


class StreamingLoader(DataLoader):
    """DataLoader that tells its ``StreamingDataset`` the epoch before workers are started.

    Workers receive a pickled copy of the dataset when an epoch's iterator is created, so the epoch
    must be set here, in the main process; ``persistent_workers`` would freeze it and is refused.
    """

    def __init__(self, dataset: StreamingDataset, epoch_fn: Callable[[], int] | None = None, **kwargs: Any):
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers=True would freeze the stream's epoch seed; leave it False.")
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn
        self._iterations = 0

    def __iter__(self):
        epoch = self._epoch_fn() if self._epoch_fn is not None else self._iterations
        self.dataset.epoch = epoch  # type: ignore[attr-defined]
        self._iterations += 1
        return super().__iter__()


def default_collate_tensors(samples: list[dict], keys: Sequence[str]) -> dict:
    """Stack tensors / numbers under ``keys``; keep everything else as lists."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        values = [s[k] for s in samples]
        if k in keys and isinstance(values[0], torch.Tensor):
            out[k] = torch.stack(values)
        elif k in keys and isinstance(values[0], (int, float)):
            out[k] = torch.tensor(values)
        else:
            out[k] = values
    return out
