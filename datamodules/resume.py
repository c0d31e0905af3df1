"""What a checkpointed stream position means when the run resumes, also after the stream changed.

A position is saved as batches done in the epoch plus each reader's ``(batches done, raw samples
pulled)``, together with the *shape* of the stream it was measured in (``StreamShape``: samples per
epoch, batch size, ranks, readers, seed, and a fingerprint of the shard set: names, byte sizes,
modification times, sample counts). On resume the saved shape is compared with the current one:

- nothing changed: every reader continues exactly where it was (the batches of the uninterrupted run);
- the same epoch content (same shards, seed, samples per epoch), read differently (another batch size,
  worker count or number of ranks): the global sample position is known, so the epoch continues from
  it. With the same readers (only the batch size changed) each reader continues at its own position:
  no sample of the epoch is repeated or skipped. With other readers, each new reader starts where
  it would stand had this layout read the epoch from its start;
- other content (a shard added, removed, renamed or rewritten; another seed or epoch length): the
  interrupted epoch restarts from its first batch under the new stream.

The plan also gives the training loop's batch counter in the new units (``ResumePlan.batches``), which
the datamodule writes into the checkpoint Lightning is restoring, so the loop and the stream agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mmalign.distributed import worker_share


@dataclass(frozen=True)
class StreamShape:
    """What a stream position is measured in."""

    epoch_samples: int  # global samples per epoch
    batches_per_rank: int
    batch_size: int
    world_size: int
    readers: int  # reader processes per rank (num_workers, at least 1)
    seed: int
    resampled: bool
    shards: dict = field(default_factory=dict)  # {"count", "digest", "entries"} (shards.shard_fingerprint)
    rank: int = 0

    def content(self) -> tuple:
        return self.epoch_samples, self.seed, self.resampled, self.shards.get("digest")

    def layout(self) -> tuple:
        return self.world_size, self.readers


@dataclass
class ResumePlan:
    kind: str  # "exact", "continue" or "restart"
    batches: int  # batches of the epoch this rank has done, in the current batch size
    workers: dict[int, tuple[int, int]]  # reader -> (batches done, raw samples pulled)
    note: str | None = None


def _saved_shape(state: dict) -> StreamShape | None:
    """The shape a checkpoint was saved in; None for checkpoints of older versions (no shape)."""
    shape = state.get("shape")
    return StreamShape(**shape) if isinstance(shape, dict) else None


def _shard_changes(old: dict, new: dict) -> str:
    if old.get("digest") == new.get("digest"):
        return ""
    a = {e[0]: e[1:] for e in old.get("entries") or []}
    b = {e[0]: e[1:] for e in new.get("entries") or []}
    if not a or not b:
        return f"the shard set ({old.get('count')} -> {new.get('count')} shards, contents differ)"
    parts = []
    for what, names in (("removed", sorted(set(a) - set(b))), ("added", sorted(set(b) - set(a))),
                        ("rewritten", sorted(n for n in set(a) & set(b) if a[n] != b[n]))):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{len(names)} shard(s) {what}: {shown}")
    return "; ".join(parts)


def describe_changes(old: StreamShape, new: StreamShape) -> str:
    """``batch_size 64 -> 32, 1 shard(s) removed: s-0003.tar``: what differs, for the one-line notice."""
    changes = [f"{name} {getattr(old, key)} -> {getattr(new, key)}" for key, name in
               (("batch_size", "batch_size"), ("readers", "readers per rank"), ("world_size", "ranks"),
                ("seed", "seed"), ("resampled", "resampled"), ("epoch_samples", "samples per epoch"))
               if getattr(old, key) != getattr(new, key)]
    shards = _shard_changes(old.shards, new.shards)
    return ", ".join(changes + ([shards] if shards else [])) or "nothing"


def plan_resume(state: dict, now: StreamShape) -> ResumePlan:
    """Where this rank's readers continue, given a saved position ``state`` and the current ``now``."""
    batches = int(state.get("batches", 0))
    saved = _saved_shape(state)
    workers = {int(w): (int(d), int(c)) for w, (d, c) in (state.get("workers") or {}).items()}
    if saved is None:  # an older checkpoint: the fields it kept must all agree, else restart
        same = (state.get("num_workers"), state.get("batch_size"), state.get("seed"),
                state.get("batches_per_rank")) == (now.readers, now.batch_size, now.seed, now.batches_per_rank)
        if same and state.get("num_shards") == now.shards.get("count"):
            return ResumePlan("exact", batches, workers)
        return ResumePlan("restart", 0, {}, f"[resume] the stream changed since the checkpoint (saved by an older "
                                            f"version): epoch {state.get('epoch')} restarts from its first batch.")
    if saved == StreamShape(**{**asdict(now), "rank": saved.rank}):
        if saved.rank != now.rank:  # another rank's cursors: each reader pulled done x batch samples (no skips)
            workers = {w: (d, d * now.batch_size) for w, (d, _) in workers.items()}
        return ResumePlan("exact", batches, workers)
    what = describe_changes(saved, now)
    epoch = state.get("epoch")
    if saved.content() != now.content():
        return ResumePlan("restart", 0, {}, f"[resume] changed since the checkpoint: {what}. Epoch {epoch} restarts "
                                            f"from its first batch under the new stream ({batches} batch(es) of it "
                                            "were trained on before).")
    seen = batches * saved.batch_size * saved.world_size  # samples of this epoch consumed, all ranks
    new_batches = min(seen // (now.batch_size * now.world_size), now.batches_per_rank)
    done = {w: worker_share(new_batches, now.readers, w) for w in range(now.readers)}
    if saved.layout() == now.layout():
        if saved.rank != now.rank:
            workers = {w: (d, d * saved.batch_size) for w, (d, _) in workers.items()}
        moved = {w: (done[w], workers.get(w, (0, 0))[1]) for w in range(now.readers)}
        how = "every reader at its own position"
    else:
        moved = {w: (done[w], done[w] * now.batch_size) for w in range(now.readers)}
        how = "the new readers from where this layout would stand"
    note = (f"[resume] changed since the checkpoint: {what}. Epoch {epoch} continues from sample {seen} of "
            f"{now.epoch_samples} (batch {new_batches} of {now.batches_per_rank} per rank), {how}.")
    return ResumePlan("continue", new_batches, moved, note)
