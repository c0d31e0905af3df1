"""The streaming core: shards -> raw samples -> shuffle -> decode -> batches, split by rank and worker.

Guarantees (tested, with 2 gloo processes where ranks matter):
- every rank reads a disjoint set of shards (without ``resampled``), dealt so readers hold
  near-equal sample counts, and re-dealt every epoch (the epoch seeds the permutation);
- every rank yields exactly ``batches_per_rank`` batches per epoch, whatever the shard sizes: a
  reader that runs dry starts its own shards again (re-shuffled), one with more data stops early.
  Equal batch counts are what keep DDP's all-reduce from waiting forever;
- exact mid-epoch resume: shuffling happens on raw (undecoded) samples, so the order a reader
  pulls samples in is a pure function of (seed, epoch, reader) and never of which samples failed
  to decode; each sample is decoded under an RNG seeded by its position, so augmentation is
  reproducible too. A reader's position is one integer (samples pulled), and a resumed epoch
  skips to it without decoding what came before;
- samples that fail to decode are skipped and counted; truncated shards count the samples they
  lost (from the shard index), not one event. The count travels beside each batch to the
  loader, which adds it to the datamodule's ``DataHealth``: no bookkeeping key ever enters a
  batch. A reader that finds more than ``max_skip_fraction`` of its samples unusable stops with
  an error instead of training on repeats of the few good ones.

Batches are assembled inside the workers (DataLoader ``batch_size=None``), which is what makes the
per-worker batch quota exact.
"""

from __future__ import annotations

import random
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .health import DataHealth, DataHealthError, SkipReport
from .errors import DataConfigError, ShardError
from .resume import ResumePlan, StreamShape, plan_resume
from .shards import iter_tar_samples, shard_fingerprint
from mmalign.distributed import StreamSlot, assign_shards, current_slot, split_evenly, worker_share

_PASS_END = object()  # marks the end of one pass over a reader's shards


def _decode_or_reason(decode: Callable[[dict], dict], raw: dict) -> tuple[dict | None, str | None]:
    try:
        return decode(raw), None
    except DataConfigError:
        raise
    except Exception as exc:  # a corrupt payload: any decoder error means "skip this sample"
        return None, f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}: {type(exc).__name__}: {exc}"


@contextmanager
def _seeded(seed: int):
    """Run a decode under torch/python RNGs seeded for this sample, then restore the caller's
    state (with num_workers=0 the decode runs in the training process, whose RNG must not move).
    Only the CPU generator is seeded: ``torch.manual_seed`` would also re-seed every CUDA device
    (whose state is not restored here) and, before CUDA is initialised, queue a lazy call that
    formats a stack trace, which cost a quarter of the in-process decode time."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)


def _sample_seed(seed: int, epoch: int, reader: int, position: int) -> int:
    return (((seed * 1_000_003 + epoch) * 1_000_003 + reader) * 1_000_003 + position) % (2**63)


_GOLDEN = (5 ** 0.5 - 1) / 2


def _rotation(epoch: int, url: str, size: int) -> int:
    """Where a shard starts this epoch. Offsets step by the golden ratio of its size, so the parts a
    reader reaches before its quota ends cover the whole shard within a few epochs (a random offset
    would leave gaps for longer), and differ between shards by a phase taken from the shard's name."""
    import zlib

    phase = zlib.crc32(url.rsplit("/", 1)[-1].encode()) / 2**32  # the name: a moved dataset keeps its order
    return int(((epoch + phase) * _GOLDEN % 1.0) * size)


@dataclass
class StreamItem:
    """What a reader hands the loader: the batch plus the reader's bookkeeping for it."""

    batch: dict
    report: SkipReport
    worker: int
    batches: int  # batches this worker has produced this epoch, this one included
    cursor: int  # raw samples it has pulled from its shuffled stream this epoch


class StreamingDataset(IterableDataset):
    """Endless-per-epoch stream cut to exactly ``batches_per_rank`` batches on every rank.

    ``sizes`` (url -> sample count, from the shard index or ``sizes.json``) balances the shard
    assignment and lets a truncated shard report how many samples it lost.
    """

    def __init__(
        self,
        urls: Sequence[str],
        decode: Callable[[dict], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        batches_per_rank: int,
        *,
        sizes: dict[str, int] | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        max_skip_fraction: float = 0.5,
        epoch_samples: int | None = None,
    ) -> None:
        self.urls = list(urls)
        self.sizes = dict(sizes or {})
        self.decode, self.collate = decode, collate
        self.batch_size, self.batches_per_rank = batch_size, batches_per_rank
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.resampled = resampled
        self.rank, self.world_size = rank, world_size
        self.max_skip_fraction = max_skip_fraction
        self.epoch_samples = epoch_samples
        self._fingerprint: dict | None = None
        self.epoch = 0
        self.resume: dict[int, tuple[int, int]] = {}  # worker -> (batches done, cursor), this epoch only
        # A resumed epoch continues at batch k, which belongs to worker k % W, but a new DataLoader
        # asks its worker 0 first: worker i therefore plays reader (i + offset) % W.
        self.worker_offset = 0
        # Persistent workers keep the copy of this object they got at their start: the epoch and the
        # resume position then reach them through this shared-memory tensor instead (``share``).
        self._shared: torch.Tensor | None = None

    def shape(self, readers: int) -> StreamShape:
        """What a saved position of this stream is measured in (``datamodules.resume``)."""
        if self._fingerprint is None:
            self._fingerprint = shard_fingerprint(self.urls, self.sizes)
        slot = current_slot(self.rank, self.world_size)
        samples = self.epoch_samples or self.batches_per_rank * self.batch_size * slot.world_size
        return StreamShape(samples, self.batches_per_rank, self.batch_size, slot.world_size, readers, self.seed,
                           self.resampled, self._fingerprint, slot.rank)

    def share(self, readers: int) -> None:
        """Publish epoch, offset and resume position through shared memory (persistent workers)."""
        self._shared = torch.full((2 + 2 * readers,), -1, dtype=torch.long).share_memory_()

    def set_position(self, epoch: int, offset: int, resume: dict[int, tuple[int, int]]) -> None:
        self.epoch, self.worker_offset, self.resume = epoch, offset, dict(resume)
        if self._shared is not None:
            self._shared.fill_(-1)
            self._shared[0], self._shared[1] = epoch, offset
            for w, (done, cursor) in resume.items():
                self._shared[2 + 2 * w], self._shared[3 + 2 * w] = done, cursor

    def _read_position(self) -> None:
        if self._shared is None:
            return
        v = self._shared.tolist()
        self.epoch, self.worker_offset = v[0], v[1]
        self.resume = {w: (v[2 + 2 * w], v[3 + 2 * w]) for w in range((len(v) - 2) // 2) if v[2 + 2 * w] >= 0}

    def __len__(self) -> int:
        return self.batches_per_rank

    def shards_of(self, slot: StreamSlot) -> list[str]:
        """The shards ``slot`` reads this epoch (same permutation on every rank: disjoint readers)."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}-perm").shuffle(order)
        sizes = [self.sizes.get(self.urls[i]) for i in order]
        mine = [self.urls[order[p]] for p in assign_shards(sizes, slot)]
        if not mine:
            raise ShardError(f"reader {slot} got no shard: {len(self.urls)} shards for {slot.count} "
                             "readers. Use fewer workers, more shards, or resampled: true.")
        return mine

    def _shard_order(self, slot: StreamSlot, rng: random.Random) -> Iterator[str | None]:
        if self.resampled:
            while True:  # shards drawn with replacement: no per-rank disjointness, by design
                yield rng.choice(self.urls)
        mine = self.shards_of(slot)
        while True:
            if self.shuffle:
                rng.shuffle(mine)
            yield from mine
            yield None  # pass boundary

    def _raw(self, slot: StreamSlot, rng: random.Random, holder: list[SkipReport]) -> Iterator[Any]:
        read, failures = 0, []
        for url in self._shard_order(slot, rng):
            if url is None:
                if read == 0:  # a whole pass without one sample: looping again would never end
                    why = "; ".join(failures[:3]) or "all empty"
                    raise ShardError(f"reader {slot.index} (rank {slot.rank}, worker {slot.worker}): none of its "
                                     f"shards yielded a sample in a whole pass ({why}). Fix or remove them.")
                read, failures = 0, []
                yield _PASS_END
                continue
            errors: list[str] = []
            n = 0
            expected = self.sizes.get(url)
            start = _rotation(self.epoch, url, expected) if self.shuffle and expected and expected > 1 else 0
            for raw in iter_tar_samples(url, errors, start):
                n += 1
                yield raw
            read += n
            failures += errors[:1]
            if errors:
                lost = max(1, expected - n) if expected else 1
                note = f" ({lost} of {expected} samples lost)" if expected else " (sample count unknown; counted as 1)"
                holder[0].add(lost, errors[0] + note)

    def _shuffled(self, samples: Iterator[Any], rng: random.Random) -> Iterator[dict]:
        # The buffer drains at every pass boundary: a buffer larger than a reader's data must not
        # fill up with repeats of it before yielding anything.
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

    def __iter__(self) -> Iterator[StreamItem]:
        self._read_position()
        slot = current_slot(self.rank, self.world_size)
        if self.worker_offset:
            slot = replace(slot, worker=(slot.worker + self.worker_offset) % slot.num_workers)
        quota = split_evenly(self.batches_per_rank, slot.num_workers, slot.worker)
        done, cursor = self.resume.get(slot.worker, (0, 0))
        if done >= quota:
            return
        rng = random.Random(f"{self.seed}-{self.epoch}-{slot.index}")
        holder = [SkipReport()]
        stream = self._shuffled(self._raw(slot, rng, holder), rng)
        for _ in range(cursor):  # resume: replay the raw order without decoding it
            next(stream)
        holder[0] = SkipReport()  # what was skipped before the position was reported before the kill
        seen = bad = 0
        while done < quota:
            samples: list[dict] = []
            while len(samples) < self.batch_size:
                raw = next(stream)
                cursor += 1
                with _seeded(_sample_seed(self.seed, self.epoch, slot.index, cursor)):
                    sample, reason = _decode_or_reason(self.decode, raw)
                seen += 1
                if sample is None:
                    holder[0].add(1, reason)
                    bad += 1
                else:
                    samples.append(sample)
                self._check_health(slot, seen, bad, holder[0])
            done += 1
            report, holder[0] = holder[0], SkipReport()
            yield StreamItem(self.collate(samples), report, slot.worker, done, cursor)

    def _check_health(self, slot: StreamSlot, seen: int, bad: int, report: SkipReport) -> None:
        if seen >= max(2 * self.batch_size, 32) and bad > self.max_skip_fraction * seen:
            raise DataHealthError(
                f"reader {slot.index} (rank {slot.rank}, worker {slot.worker}): {bad} of the {seen} samples it read "
                f"were unusable, more than max_skip_fraction={self.max_skip_fraction}. Training on the rest would "
                f"repeat a few samples over and over. Examples: {report.reasons[:3]}. Fix or remove the bad shards "
                "(or the caption/label settings), or raise max_skip_fraction if this is expected.")


class StreamingLoader(DataLoader):
    """DataLoader over a ``StreamingDataset``: sets the epoch, strips and records each batch's
    bookkeeping, and saves/restores the position within an epoch for exact resume.

    ``position()`` is the state a checkpoint keeps; ``restore(state)`` continues from one, also when the
    stream changed since (``datamodules.resume``: exactly, from the global sample position, or from
    the start of the interrupted epoch, with a one-line notice). ``progress_fn`` returns how many
    batches of the current epoch the training loop has consumed; batches the DataLoader prefetched
    beyond that are not part of the saved position. Lightning's ``_Stateful`` protocol
    (``state_dict``/``load_state_dict``) maps to the same two methods unless ``owner_restores``: then
    the datamodule saves and restores the position itself (once, before Lightning restores its loop).
    """

    def __init__(self, dataset: StreamingDataset, epoch_fn: Callable[[], int] | None = None,
                 progress_fn: Callable[[], int] | None = None, health: DataHealth | None = None,
                 owner_restores: bool = False, **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        if self.persistent_workers:
            dataset.share(self._readers)
        self._epoch_fn, self._progress_fn = epoch_fn, progress_fn
        self.health = health if health is not None else DataHealth()
        self.owner_restores = owner_restores
        self._iterations = 0
        self._epoch = 0
        self._yielded = 0
        self._history: dict[int, deque] = {}
        self._pending: dict | None = None

    @property
    def _readers(self) -> int:
        return max(1, self.num_workers)

    def shape(self) -> StreamShape:
        return self.dataset.shape(self._readers)  # type: ignore[attr-defined]

    def __iter__(self):
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        epoch = self._epoch_fn() if self._epoch_fn is not None else self._iterations
        self._iterations += 1
        self._epoch = epoch
        resume: dict[int, tuple[int, int]] = {}
        self._history = {w: deque([(0, 0)], maxlen=64) for w in range(self._readers)}
        self._yielded = 0
        pending = self._pending
        if pending is not None and pending["epoch"] != epoch:
            pending = self._pending = None
        if pending is not None:
            # Kept until a batch of the resumed epoch is handed out: Lightning may create an iterator
            # once at set-up (to count batches) before the one the epoch really reads.
            resume = {int(w): (int(b), int(c)) for w, (b, c) in pending["workers"].items()}
            for w, pos in resume.items():
                self._history[w].append(pos)
            self._yielded = int(pending["batches"])
        ds.set_position(epoch, self._yielded % self._readers, resume)
        return self._batches(super().__iter__())

    def _batches(self, items):
        for item in items:
            self._pending = None
            self.health.add("train", item.report)
            self._history[item.worker].append((item.batches, item.cursor))
            self._yielded += 1
            yield item.batch

    def position(self) -> dict:
        consumed = self._progress_fn() if self._progress_fn is not None else self._yielded
        if self._pending is not None:  # restored, not read yet: the restored position still holds
            return {**self._pending, "shape": asdict(self.shape()), "health": self.health.state_dict()}
        workers = {}
        for w in range(self._readers):
            share = worker_share(consumed, self._readers, w)
            pos = next((p for p in reversed(self._history.get(w, ())) if p[0] == share), None)
            if pos is None:
                raise RuntimeError(f"stream position of worker {w} after {consumed} batches is unknown (history "
                                   f"{list(self._history.get(w, ()))}); this is a bug in the stream bookkeeping.")
            workers[w] = list(pos)
        return {"epoch": self._epoch, "batches": consumed, "workers": workers, "shape": asdict(self.shape()),
                "health": self.health.state_dict()}

    def restore(self, state: dict, notify: bool = True) -> ResumePlan:
        """Continue from a saved ``position()``; returns the plan (``kind``: exact, continue or restart)."""
        self.health.load_state_dict(state.get("health", {}))
        plan = plan_resume(state, self.shape())
        if plan.note and notify and self.shape().rank == 0:
            print(plan.note, file=sys.stderr)
        self._pending = {"epoch": state.get("epoch"), "batches": plan.batches,
                         "workers": {w: list(p) for w, p in plan.workers.items()}}
        return plan

    def state_dict(self) -> dict:
        return {} if self.owner_restores else self.position()

    def load_state_dict(self, state: dict) -> None:
        if not self.owner_restores and state:
            self.restore(state)


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
