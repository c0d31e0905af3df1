"""Evaluation sets: every sample exactly once, split across ranks without padding.

Validation/test shards are small enough to hold in memory still encoded; samples are decoded on
access, a corrupt one is skipped and counted (never yielded as an empty batch), and rank r takes
indices r, r+W, ... so no metric counts a sample twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .health import DataHealth, SkipReport
from .shards import iter_tar_samples
from .stream import _decode_or_reason


class SkippedSample:
    """Placeholder returned by the in-memory dataset for a sample that failed to decode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class InMemoryDataset(Dataset):
    """Small evaluation sets: raw (still encoded) samples held in memory, decoded on access.

    Every sample is seen exactly once per pass, which streaming with equal batch counts cannot
    promise; fine for validation/test sets up to a few 100k small samples. ``load_report`` counts
    what could not even be read (truncated shards: the samples they lost, when ``sizes`` knows).
    """

    def __init__(self, urls: Sequence[str], decode: Callable[[dict], dict], max_samples: int | None = None,
                 sizes: dict[str, int] | None = None):
        self.decode = decode
        self.raw: list[dict] = []
        self.load_report = SkipReport()
        for url in urls:
            errors: list[str] = []
            n = 0
            for raw in iter_tar_samples(url, errors):
                self.raw.append(raw)
                n += 1
                if max_samples is not None and len(self.raw) >= max_samples:
                    return
            if errors:
                expected = (sizes or {}).get(url)
                self.load_report.add(max(1, expected - n) if expected else 1, errors[0])

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> dict | SkippedSample:
        sample, reason = _decode_or_reason(self.decode, self.raw[i])
        return SkippedSample(reason) if sample is None else sample


class EvalCollate:
    """Collate that drops and counts ``SkippedSample``s: returns ``(batch or None, SkipReport)``."""

    def __init__(self, collate: Callable[[list[dict]], dict]) -> None:
        self.collate = collate

    def __call__(self, items: list) -> tuple[dict | None, SkipReport]:
        good = [x for x in items if not isinstance(x, SkippedSample)]
        report = SkipReport()
        for x in items:
            if isinstance(x, SkippedSample):
                report.add(1, x.reason)
        return (self.collate(good) if good else None), report


class EvalLoader(DataLoader):
    """DataLoader over an ``InMemoryDataset`` that records skipped samples under ``stage`` and never
    yields an empty batch (one whose every sample was corrupt)."""

    def __init__(self, dataset: InMemoryDataset, collate: Callable[[list[dict]], dict], stage: str,
                 health: DataHealth | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, collate_fn=EvalCollate(collate), **kwargs)
        self.stage = stage
        self.health = health if health is not None else DataHealth()

    def __iter__(self):
        return self._batches(super().__iter__())

    def _batches(self, items):
        for batch, report in items:
            self.health.add(self.stage, report)
            if batch is not None:
                yield batch


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
