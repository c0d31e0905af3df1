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

from .health import DataHealth
from .shards import ShardError, ShardIndex, _is_remote, expand_shards, index_shard, read_sizes_file
from .slots import batches_per_rank, get_rank, get_world_size
from .eval_sets import EvalLoader, InMemoryDataset, UnpaddedDistributedSampler
from .stream import StreamingDataset, StreamingLoader

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
        predict_shards: Shards for ``predict`` (every sample once, like test; default: the
            ``test_shards``). Models that make their own inputs (REPA's class labels) need none.
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
        max_skip_fraction: Largest fraction of unusable samples (corrupt, or lacking a required
            member) a shard or reader may have before set-up or training stops with an error;
            below it, skipped samples are counted and reported.
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
        predict_shards: ShardSpec = None,
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
        max_skip_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}.")
        if resampled and not samples_per_epoch:
            raise ValueError("resampled: true needs samples_per_epoch (the global number of samples per epoch).")
        if generate is not None:
            from .generate import GENERATORS

            if generate not in GENERATORS:
                raise ValueError(f"generate: unknown dataset '{generate}'. Choose one of {sorted(GENERATORS)}.")
        self.data_root = data_root
        self.shards = {"fit": self._rooted(train_shards), "validate": self._rooted(val_shards),
                       "test": self._rooted(test_shards), "predict": self._rooted(predict_shards)}
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
        self.max_skip_fraction = max_skip_fraction
        self.health = DataHealth()  # skipped samples per stage; reported by mmalign's DataHealthMonitor
        self._train: StreamingDataset | None = None
        self._train_loader: StreamingLoader | None = None
        self._stream_state: dict | None = None
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
    def _generated_roots(self) -> dict[str, set[str]]:
        """Roots of the built-in dataset to create: the parents of configured split folders that do
        not exist. A missing folder is only generated when it can be what the generator writes: its
        root is named after the dataset (``.../shapes``, ``.../shapes32``) and the split is one the
        generator knows; anything else is a typo and fails instead of silently creating a dataset.
        Returns ``{root: {missing split folders}}``."""
        from .generate import SPLITS

        roots: dict[str, set[str]] = {}
        for key, spec in self.shards.items():
            for s in [spec] if isinstance(spec, str) else (spec or []):
                if _is_remote(s) or os.path.exists(s):
                    continue
                root, split = os.path.split(os.path.normpath(s))
                what = self._spec_name(key)
                if not os.path.basename(root).startswith(self.generate):
                    raise ShardError(f"{what}: '{s}' does not exist, and generate: {self.generate} only writes into a "
                                     f"folder named after the dataset ('.../{self.generate}/{split}'), so this looks "
                                     f"like a typo in the path. Fix the path, or name the folder '{self.generate}*'.")
                if split not in SPLITS[self.generate]:
                    raise ShardError(f"{what}: '{s}' does not exist and '{split}' is not a split of the built-in "
                                     f"'{self.generate}' dataset ({', '.join(SPLITS[self.generate])}). Fix the split name.")
                roots.setdefault(root, set()).add(split)
        return roots

    @staticmethod
    def _spec_name(key: str) -> str:
        names = {"fit": "train_shards", "validate": "val_shards", "test": "test_shards", "predict": "predict_shards"}
        return names.get(key, f"extra_val_shards.{key.partition(':')[2]}")

    def prepare_data(self) -> None:
        """Create the built-in dataset on first use (local rank 0 only; Lightning then barriers)."""
        if self.generate is None:
            return
        from .generate import generate_dataset

        for root, splits in self._generated_roots().items():
            generate_dataset(self.generate, root, **self.generate_kwargs)
            absent = sorted(s for s in splits if not os.path.exists(os.path.join(root, s)))
            if absent:  # an earlier, complete dataset at root was generated without these splits
                raise ShardError(f"'{root}' holds a '{self.generate}' dataset generated earlier without the split(s) "
                                 f"{absent} this config reads (generate_kwargs {self.generate_kwargs}). Delete '{root}' "
                                 "to regenerate it, or point data_root elsewhere.")

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer  # set by Lightning when the datamodule is attached
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return get_rank(), get_world_size()

    def _index(self, urls: list[str], what: str) -> dict[str, int]:
        """Sample counts per shard (``sizes.json``, overridden by the index of local shards when
        ``validate_shards``); the index also checks members and labels."""
        sizes = read_sizes_file(urls)
        if self.validate_shards:
            for url in (u for u in urls if not _is_remote(u)):
                index = index_shard(url, self.index_read, self.required)
                self._check_required(index, what)
                self.check_index(index)
                sizes[url] = index.num_samples
        return sizes

    def _count(self, urls: list[str], sizes: dict[str, int], what: str) -> int:
        if self.samples_per_epoch:
            return self.samples_per_epoch
        unknown = [u for u in urls if u not in sizes]
        if unknown:
            raise ShardError(f"{what}: cannot count samples of '{unknown[0]}' (remote or unindexed, no "
                             "sizes.json). Set samples_per_epoch, or validate_shards: true for local shards.")
        return sum(sizes[u] for u in urls)

    def _check_required(self, index: ShardIndex, what: str = "shards") -> None:
        if index.num_samples == 0:
            raise ShardError(f"{what}: shard '{index.url}' holds no samples. Remove it from the shard list.")
        for alternatives in self.required:
            have = sum(index.ext_counts.get(ext, 0) for ext in alternatives)
            if have == 0:
                raise ShardError(f"{what}: shard '{index.url}' has no sample with a "
                                 f"{'/'.join('.' + e for e in alternatives)} member (members seen: "
                                 f"{sorted(index.ext_counts)}). Wrong shard or wrong datamodule?")
        missing = index.num_samples - index.complete
        if self.required and missing > self.max_skip_fraction * index.num_samples:
            need = " + ".join("/".join("." + e for e in alt) for alt in self.required)
            raise ShardError(f"{what}: {missing} of the {index.num_samples} samples of shard '{index.url}' lack a "
                             f"required member ({need}; e.g. {index.incomplete_keys}), more than max_skip_fraction="
                             f"{self.max_skip_fraction}. Batches would repeat the few complete samples. Fix the "
                             "shard, point caption_key/label_key at the right member, or raise max_skip_fraction.")

    def setup(self, stage: str) -> None:
        rank, world = self._world()
        if stage == "fit":
            urls = expand_shards(self.shards["fit"], "train_shards")
            if not self.resampled and len(urls) < world * max(1, self.num_workers):
                raise ShardError(f"train_shards: {len(urls)} shard(s) for {world} rank(s) x "
                                 f"{max(1, self.num_workers)} worker(s): every reader needs its own shard. "
                                 "Re-shard into more files, lower num_workers, or set resampled: true with "
                                 "samples_per_epoch.")
            sizes = self._index(urls, "train_shards")
            total = self._count(urls, sizes, "train_shards")
            n_batches = batches_per_rank(total, world, self.batch_size, self.drop_last)
            if n_batches == 0:
                raise ShardError(f"train_shards: {total} samples cannot fill one batch of {self.batch_size} "
                                 f"on each of {world} rank(s). Lower batch_size or add data.")
            self._train = StreamingDataset(
                urls, self._decode_train, self.collate, self.batch_size, n_batches, sizes=sizes,
                shuffle_buffer=self.shuffle_buffer, seed=self.seed, resampled=self.resampled,
                rank=rank, world_size=world, max_skip_fraction=self.max_skip_fraction)
            log.info("train stream: %d shards, %d samples, %d batches/rank", len(urls), total, n_batches)
        if stage in ("fit", "validate"):
            evals = [k for k in self.shards if k.startswith("validate")]
        elif stage == "predict":
            evals = ["predict"] if self.shards.get("predict") is not None else []
        else:
            evals = [stage]
        for split in evals:
            if split in self._eval or split not in self.shards:
                continue
            spec = self.shards[split]
            if spec is None:
                if split == stage:
                    raise ShardError(f"{split}: no {self._spec_name(split)} configured.")
                continue
            what = self._spec_name(split)
            urls = expand_shards(spec, what)
            sizes = self._index(urls, what)
            self._eval[split] = InMemoryDataset(urls, self._decode_eval, self.max_eval_samples, sizes)
            self.health.add(self._stage_name(split), self._eval[split].load_report)

    @staticmethod
    def _stage_name(split: str) -> str:
        return {"validate": "val"}.get(split.partition(":")[0], split.partition(":")[0])

    def _decode_train(self, sample: dict) -> dict:
        return self.decode(sample, train=True)

    def _decode_eval(self, sample: dict) -> dict:
        return self.decode(sample, train=False)

    # ---- loaders ------------------------------------------------------------------------------
    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _progress(self) -> int | None:
        """Batches of the current epoch the training loop has consumed (for the saved stream position)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> StreamingLoader:
        if self._train is None:
            raise RuntimeError("train_dataloader() before setup('fit'): no train_shards were set up.")
        loader = StreamingLoader(self._train, epoch_fn=self._epoch,
                                 progress_fn=self._progress if self.trainer is not None else None,
                                 health=self.health, num_workers=self.num_workers, pin_memory=self.pin_memory)
        if self._stream_state is not None:
            loader.load_state_dict(self._stream_state)
        self._train_loader = loader
        return loader

    # ---- exact resume -------------------------------------------------------------------------
    # The position within an epoch travels in the checkpoint as the datamodule's state: Lightning
    # restores it before it builds the train loader (the loader's own state would be restored too
    # late when ``configure_optimizers`` already counted batches through it).
    def state_dict(self) -> dict:
        loader = getattr(self, "_train_loader", None)
        return {"stream": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._stream_state = state.get("stream")

    def _eval_loader(self, split: str):
        if split not in self._eval:
            return []
        ds = self._eval[split]
        rank, world = self._world()
        return EvalLoader(ds, self.collate, self._stage_name(split), self.health, batch_size=self.eval_batch_size,
                          sampler=UnpaddedDistributedSampler(ds, world, rank), num_workers=self.num_workers,
                          pin_memory=self.pin_memory)

    def val_dataloader(self):
        if len(self.val_names) == 1:
            return self._eval_loader("validate")
        return [self._eval_loader("validate")] + [self._eval_loader(f"validate:{n}") for n in self.val_names[1:]]

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        """``predict_shards`` when configured; else the model's own ``predict_dataloader`` (a generative
        model makes its own inputs, e.g. class labels to sample); else the ``test_shards``."""
        if "predict" in self._eval:
            return self._eval_loader("predict")
        model = self.trainer.lightning_module if self.trainer is not None else None
        own = getattr(type(model), "predict_dataloader", None) if model is not None else None
        if own is not None and own is not pl.LightningModule.predict_dataloader:
            return model.predict_dataloader()
        if self.shards.get("test") is None:
            raise ShardError("predict: set data.init_args.predict_shards (or test_shards) to the shards to predict on "
                             f"({type(model).__name__ if model is not None else 'this model'} makes no inputs of its "
                             "own).")
        self.shards["predict"] = self.shards["test"]
        self.setup("predict")
        return self._eval_loader("predict")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}.")
