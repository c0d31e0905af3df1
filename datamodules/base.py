"""``StreamingDataModule``: the Lightning face of the streaming core, shared by every modality.

Subclasses say which members a sample needs (``required``), how to decode one sample
(``decode``) and how to collate a batch (``collate``). Everything else — shard discovery and
validation, generation of the built-in datasets, rank/worker splitting, equal batch counts,
in-memory evaluation sets, transforms and tokenizers handed over by the model — lives here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import lightning.pytorch as pl

from mmalign.distributed import batches_per_rank, get_rank, get_world_size

from .shards import ShardError, ShardIndex, _is_remote, expand_shards, index_shard, read_sizes_file
from .stream import EvalCollate, InMemoryDataset, StreamingDataset, StreamingLoader, UnpaddedDistributedSampler

log = logging.getLogger(__name__)

ShardSpec = str | list[str] | None


@dataclass
class Preprocess:
    """What a model needs done to raw samples; models expose one as ``model.preprocess`` and the
    CLI links it into the datamodule (``link_arguments(..., apply_on="instantiate")``)."""

    train_transform: Callable | None = None
    eval_transform: Callable | None = None
    tokenizer: Callable | None = None


class StreamingDataModule(pl.LightningDataModule):
    """Base datamodule over webdataset shards.

    Args:
        train_shards: Training shards: a directory, brace pattern, glob, list, or ``pipe:`` command.
        val_shards: Validation shards (loaded into memory, every sample evaluated once).
        test_shards: Test shards (same as validation).
        batch_size: Per-process batch size.
        eval_batch_size: Per-process evaluation batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: Samples held in the seeded shuffle buffer of each reader.
        seed: Seed of shard order and shuffle buffer (combined with epoch, rank and worker).
        resampled: Draw shards with replacement; needs ``samples_per_epoch``. Use it when there are
            fewer shards than ranks x workers, or for endless LAION-style streams.
        samples_per_epoch: Global samples per epoch. Required for ``pipe:``/remote shards without a
            ``sizes.json`` and for ``resampled``; otherwise counted from the shards.
        drop_last: Drop the final partial global batch of an epoch (else round up and repeat).
        validate_shards: Index local shards at set-up: counts, required members, label range.
        max_eval_samples: Cap on samples loaded per evaluation split.
        generate: Built-in dataset to create when the configured shard directories do not exist
            (``shapes``, ``digits`` or ``spoken``). The shard specs must then be ``<root>/<split>`` directories.
        generate_kwargs: Extra arguments of the generator (sizes, image size, seed...).
        preprocess: Transforms and tokenizer; normally linked from the model by the CLI.
        pin_memory: Pin host memory of batches (useful on GPU).
        data_root: Directory that relative local shard specs are resolved against.
        extra_val_shards: More named validation sets, e.g. ``{heldout: shapes/heldout}``; each
            gets its own dataloader and its metrics are logged under its name (the main one is
            ``val``).
    """

    #: member-extension alternatives every sample must have, e.g. (("jpg", "png", "webp"), ("txt",))
    required: tuple[tuple[str, ...], ...] = ()
    #: small text members read during indexing (e.g. labels)
    index_read: tuple[str, ...] = ()

    def __init__(
        self,
        train_shards: ShardSpec = None,
        val_shards: ShardSpec = None,
        test_shards: ShardSpec = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        drop_last: bool = True,
        validate_shards: bool = True,
        max_eval_samples: int | None = None,
        generate: str | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        preprocess: Preprocess | None = None,
        pin_memory: bool = False,
        data_root: str | None = None,
        extra_val_shards: dict[str, str | list[str]] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if resampled and not samples_per_epoch:
            raise ValueError("resampled: true needs samples_per_epoch (the global number of samples per epoch).")
        if generate is not None:
            from .generate import GENERATORS

            if generate not in GENERATORS:
                raise ValueError(f"generate: unknown dataset '{generate}'. Choose one of {sorted(GENERATORS)}.")
        self.data_root = data_root
        self.shards = {"fit": self._rooted(train_shards), "validate": self._rooted(val_shards),
                       "test": self._rooted(test_shards)}
        for name, spec in (extra_val_shards or {}).items():
            if name in ("val", "fit", "validate", "test"):
                raise ValueError(f"extra_val_shards: '{name}' is reserved; pick another name.")
            self.shards[f"validate:{name}"] = self._rooted(spec)
        self.val_names = ["val"] + list(extra_val_shards or {})
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.resampled, self.samples_per_epoch, self.drop_last = resampled, samples_per_epoch, drop_last
        self.validate_shards, self.max_eval_samples = validate_shards, max_eval_samples
        self.generate, self.generate_kwargs = generate, dict(generate_kwargs or {})
        self.preprocess = preprocess or Preprocess()
        self.pin_memory = pin_memory
        self._train: StreamingDataset | None = None
        self._eval: dict[str, InMemoryDataset] = {}

    def _rooted(self, spec: ShardSpec) -> ShardSpec:
        if self.data_root is None or spec is None:
            return spec
        join = lambda s: s if _is_remote(s) or os.path.isabs(s) else os.path.join(self.data_root, s)  # noqa: E731
        return join(spec) if isinstance(spec, str) else [join(s) for s in spec]

    # ---- subclass interface -------------------------------------------------------------------
    def decode(self, sample: dict[str, bytes], train: bool) -> dict:
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def check_index(self, index: ShardIndex) -> None:
        """Subclass hook: validate the indexed text members (e.g. labels) of one shard."""

    # ---- preparation --------------------------------------------------------------------------
    def _generated_roots(self) -> set[str]:
        roots = set()
        for spec in self.shards.values():
            for s in [spec] if isinstance(spec, str) else (spec or []):
                if not _is_remote(s) and not os.path.exists(s):
                    roots.add(os.path.dirname(os.path.normpath(s)))
        return roots

    def prepare_data(self) -> None:
        """Create the built-in dataset on first use (local rank 0 only; Lightning then barriers)."""
        if self.generate is None:
            return
        from .generate import generate_dataset

        for root in self._generated_roots():
            generate_dataset(self.generate, root, **self.generate_kwargs)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer  # set by Lightning when the datamodule is attached
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return get_rank(), get_world_size()

    def _count(self, urls: list[str], what: str) -> int:
        sizes = read_sizes_file(urls)
        local = [u for u in urls if not _is_remote(u)]
        total = 0
        if self.validate_shards and local:
            for url in local:
                index = index_shard(url, self.index_read)
                self._check_required(index)
                self.check_index(index)
                sizes[url] = index.num_samples
        for url in urls:
            if url not in sizes:
                if self.samples_per_epoch:
                    return self.samples_per_epoch
                raise ShardError(f"{what}: cannot count samples of '{url}' (remote or unindexed, no "
                                 "sizes.json). Set samples_per_epoch, or validate_shards: true for local shards.")
            total += sizes[url]
        return self.samples_per_epoch or total

    def _check_required(self, index: ShardIndex) -> None:
        if index.num_samples == 0:
            raise ShardError(f"shard '{index.url}' holds no samples. Remove it from the shard list.")
        for alternatives in self.required:
            have = sum(index.ext_counts.get(ext, 0) for ext in alternatives)
            if have == 0:
                raise ShardError(f"shard '{index.url}' has no sample with a {'/'.join('.' + e for e in alternatives)} "
                                 f"member (members seen: {sorted(index.ext_counts)}). Wrong shard or wrong datamodule?")

    def setup(self, stage: str) -> None:
        rank, world = self._world()
        if stage == "fit":
            urls = expand_shards(self.shards["fit"], "train_shards")
            if not self.resampled and len(urls) < world * max(1, self.num_workers):
                raise ShardError(f"train_shards: {len(urls)} shard(s) for {world} rank(s) x "
                                 f"{max(1, self.num_workers)} worker(s): every reader needs its own shard. "
                                 "Re-shard into more files, lower num_workers, or set resampled: true with "
                                 "samples_per_epoch.")
            total = self._count(urls, "train_shards")
            n_batches = batches_per_rank(total, world, self.batch_size, self.drop_last)
            if n_batches == 0:
                raise ShardError(f"train_shards: {total} samples cannot fill one batch of {self.batch_size} "
                                 f"on each of {world} rank(s). Lower batch_size or add data.")
            self._train = StreamingDataset(
                urls, self._decode_train, self.collate, self.batch_size, n_batches,
                shuffle_buffer=self.shuffle_buffer, seed=self.seed, resampled=self.resampled,
                rank=rank, world_size=world)
            log.info("train stream: %d shards, %d samples, %d batches/rank", len(urls), total, n_batches)
        evals = [k for k in self.shards if k.startswith("validate")] if stage in ("fit", "validate") else [stage]
        for split in evals:
            if split in self._eval or split not in self.shards:
                continue
            spec = self.shards[split]
            if spec is None:
                if split == stage:
                    raise ShardError(f"{split}: no {'val' if split == 'validate' else split}_shards configured.")
                continue
            urls = expand_shards(spec, f"{split} shards")
            if self.validate_shards:
                for url in (u for u in urls if not _is_remote(u)):
                    index = index_shard(url, self.index_read)
                    self._check_required(index)
                    self.check_index(index)
            self._eval[split] = InMemoryDataset(urls, self._decode_eval, self.max_eval_samples)

    def _decode_train(self, sample: dict) -> dict:
        return self.decode(sample, train=True)

    def _decode_eval(self, sample: dict) -> dict:
        return self.decode(sample, train=False)

    # ---- loaders ------------------------------------------------------------------------------
    def _epoch(self) -> int:
        trainer = self.trainer  # set by Lightning when the datamodule is attached
        return trainer.current_epoch if trainer is not None else 0

    def train_dataloader(self) -> StreamingLoader:
        if self._train is None:
            raise RuntimeError("train_dataloader() before setup('fit'): no train_shards were set up.")
        return StreamingLoader(self._train, epoch_fn=self._epoch, num_workers=self.num_workers,
                               pin_memory=self.pin_memory)

    def _eval_loader(self, split: str):
        if split not in self._eval:
            return []
        ds = self._eval[split]
        rank, world = self._world()
        from torch.utils.data import DataLoader

        return DataLoader(ds, batch_size=self.eval_batch_size, sampler=UnpaddedDistributedSampler(ds, world, rank),
                          num_workers=self.num_workers, collate_fn=EvalCollate(self.collate),
                          pin_memory=self.pin_memory)

    def val_dataloader(self):
        if len(self.val_names) == 1:
            return self._eval_loader("validate")
        return [self._eval_loader("validate")] + [self._eval_loader(f"validate:{n}") for n in self.val_names[1:]]

    def test_dataloader(self):
        return self._eval_loader("test")

    def eval_load_errors(self) -> dict[str, list[str]]:
        return {k: v.load_errors for k, v in self._eval.items() if v.load_errors}


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}.")
