"""``StreamingDataModule``: the Lightning face of the streaming core, shared by every modality.

Subclasses say which members a sample needs (``required``), how to decode one sample
(``decode``) and how to collate a batch (``collate``). Everything else — shard discovery and
validation, generation of the built-in datasets, rank/worker splitting, equal batch counts,
in-memory evaluation sets, transforms and tokenizers handed over by the model — lives here.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Callable

import lightning.pytorch as pl

from mmalign.distributed import batches_per_rank, get_rank, get_world_size
from mmalign.specs import as_hparams, coerce, migrate_flat, need

from .health import DataHealth
from .errors import ShardError
from .shards import ShardIndex, _is_remote, expand_shards, index_shard, read_sizes_file
from .eval_sets import EvalLoader, InMemoryDataset, UnpaddedDistributedSampler
from .resume import plan_resume
from .specs import BASE_MOVED, EvalSpec, GenerateSpec, ShardsSpec, StreamSpec, as_generate
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
        shards: Where the samples are (``train``/``val``/``test``/``predict``/``extra_val`` specs,
            ``data_root``), epoch length, indexing and the skip budget (``ShardsSpec``).
        stream: Training stream: batch size, workers, shuffle buffer, seed, resampling (``StreamSpec``).
        eval: Evaluation batch size and sample cap (``EvalSpec``).
        generate: Built-in dataset (``shapes``/``digits``/``spoken``) created when the configured split
            folders do not exist (``GenerateSpec``; a bare name is short for ``{name: NAME}``).
        preprocess: Transforms and tokenizer; normally linked from the model by the CLI.
    """

    #: member-extension alternatives every sample must have, e.g. (("jpg", "png", "webp"), ("txt",))
    required: tuple[tuple[str, ...], ...] = ()
    #: small text members read during indexing (e.g. labels)
    index_read: tuple[str, ...] = ()
    #: the flat options of older configs and their grouped places (the CLI names them in its error)
    moved_options = BASE_MOVED
    config_group = "data"

    def __init__(
        self,
        shards: ShardsSpec = ShardsSpec(),
        stream: StreamSpec = StreamSpec(),
        eval: EvalSpec = EvalSpec(),
        generate: GenerateSpec | str | None = None,
        preprocess: Preprocess | None = None,
    ) -> None:
        super().__init__()
        shards, stream = coerce(shards, ShardsSpec, "shards"), coerce(stream, StreamSpec, "stream")
        self.cfg = SimpleNamespace(shards=shards, stream=stream, eval=coerce(eval, EvalSpec, "eval"),
                                   generate=as_generate(generate))
        need(not stream.resampled or shards.samples_per_epoch is not None,
             "stream.resampled: true needs shards.samples_per_epoch (the global number of samples per epoch).")
        self.data_root = shards.data_root
        self.shards = {"fit": self._rooted(shards.train), "validate": self._rooted(shards.val),
                       "test": self._rooted(shards.test), "predict": self._rooted(shards.predict)}
        for name, spec in (shards.extra_val or {}).items():
            self.shards[f"validate:{name}"] = self._rooted(spec)
        self.val_names = ["val"] + list(shards.extra_val or {})
        self.preprocess = preprocess or Preprocess()
        self.health = DataHealth()  # skipped samples per stage; reported by mmalign's DataHealthMonitor
        self._train: StreamingDataset | None = None
        self._train_loader: StreamingLoader | None = None
        self._stream_state: dict | None = None
        self._eval: dict[str, InMemoryDataset] = {}
        self._log_hyperparams = False  # the model's hparams are logged; these are recorded in checkpoints only
        self._hparams_name = "kwargs"

    # ---- what a checkpoint records, and reading it back --------------------------------------------
    @property
    def hparams(self) -> dict:  # type: ignore[override]
        """The specs as plain mappings (weights-only loadable), always as they are now (e.g. after the
        TTA pipeline set ``label.num_classes``); Lightning writes them into every checkpoint."""
        from lightning.pytorch.utilities.parsing import AttributeDict

        return AttributeDict({k: as_hparams(v) for k, v in vars(self.cfg).items()})

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str, map_location: Any = None, hparams_file: Any = None,
                             **overrides: Any):
        """This datamodule as a checkpoint recorded it; ``overrides`` replace whole specs (``shards=...``).

        A ``pipe:`` shard spec is a shell command: one recorded in a checkpoint is refused (a file must
        not run commands), unless the caller passes that spec group again itself."""
        import torch

        try:
            ck = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ShardError(f"'{checkpoint_path}' is not a checkpoint that loads with weights_only=True "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).") from None
        hp = (ck.get("datamodule_hyper_parameters") if isinstance(ck, dict) else None) or {}
        if not hp:
            raise ShardError(f"'{checkpoint_path}' records no datamodule options (saved by an older version, or "
                             "without a datamodule): build the datamodule from your config instead.")
        hp = {k: v for k, v in migrate_flat(cls, dict(hp)).items() if not k.startswith("_")}
        commands = [f"{key}={value!r}" for key, value in _strings(hp)
                    if value.startswith("pipe:") and key.split(".")[0] not in overrides]
        if commands:
            raise ShardError(f"'{checkpoint_path}' records the shell command(s) {', '.join(commands[:3])} as pipe: "
                             "shard specs; a checkpoint never runs a command. Pass the shards yourself "
                             "(load_from_checkpoint(..., shards=...), or your config) to run them.")
        dm = cls(**{**hp, **overrides})
        if ck.get(cls.__qualname__):
            dm.load_state_dict(ck[cls.__qualname__])
        return dm

    # read by the TTA pipeline and by callers of older versions
    @property
    def batch_size(self) -> int:
        return self.cfg.stream.batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.cfg.eval.batch_size or self.cfg.stream.batch_size

    @property
    def num_workers(self) -> int:
        return self.cfg.stream.num_workers

    @property
    def seed(self) -> int:
        return self.cfg.stream.seed

    @property
    def max_skip_fraction(self) -> float:
        return self.cfg.shards.max_skip_fraction

    def _rooted(self, spec: ShardSpec) -> ShardSpec:
        if self.data_root is None or spec is None:
            return spec

        def join(s: str) -> str:  # schemes (pipe:, folder://, npy://, s3://) and absolute paths stay as given
            return s if "://" in s or _is_remote(s) or os.path.isabs(s) else os.path.join(self.data_root, s)

        return join(spec) if isinstance(spec, str) else [join(s) for s in spec]

    # ---- subclass interface -------------------------------------------------------------------
    def decode(self, sample: dict[str, bytes], train: bool) -> dict:
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def check_index(self, index: ShardIndex) -> None:
        """Subclass hook: validate the indexed text members (e.g. labels) of one shard."""

    # ---- preparation --------------------------------------------------------------------------
    @staticmethod
    def _spec_name(key: str) -> str:
        names = {"fit": "shards.train", "validate": "shards.val", "test": "shards.test", "predict": "shards.predict"}
        return names.get(key, f"shards.extra_val.{key.partition(':')[2]}")

    def prepare_data(self) -> None:
        """Create the built-in dataset on first use (local rank 0 only; Lightning then barriers)."""
        gen = self.cfg.generate
        if gen is None:
            return
        from .generate import generate_dataset, roots_to_generate

        specs = {self._spec_name(key): spec for key, spec in self.shards.items()}
        for root, splits in roots_to_generate(specs, gen.name).items():
            generate_dataset(gen.name, root, **gen.kwargs)
            absent = sorted(s for s in splits if not os.path.exists(os.path.join(root, s)))
            if absent:  # an earlier, complete dataset at root was generated without these splits
                raise ShardError(f"'{root}' holds a '{gen.name}' dataset generated earlier without the split(s) "
                                 f"{absent} this config reads (generate.kwargs {gen.kwargs}). Delete '{root}' "
                                 "to regenerate it, or point shards.data_root elsewhere.")

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer  # set by Lightning when the datamodule is attached
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return get_rank(), get_world_size()

    def _index(self, urls: list[str], what: str) -> dict[str, int]:
        """Sample counts per shard (``sizes.json``, overridden by the index of local shards when
        ``shards.validate``); the index also checks members and labels."""
        sizes = read_sizes_file(urls)
        if self.cfg.shards.validate:
            for url in (u for u in urls if not _is_remote(u)):
                index = index_shard(url, self.index_read, self.required)
                self._check_required(index, what)
                self.check_index(index)
                sizes[url] = index.num_samples
        return sizes

    def _count(self, urls: list[str], sizes: dict[str, int], what: str) -> int:
        if self.cfg.shards.samples_per_epoch:
            return self.cfg.shards.samples_per_epoch
        unknown = [u for u in urls if u not in sizes]
        if unknown:
            raise ShardError(f"{what}: cannot count samples of '{unknown[0]}' (remote or unindexed, no "
                             "sizes.json). Set shards.samples_per_epoch, or shards.validate: true for local shards.")
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
                             f"required member ({need}; e.g. {index.incomplete_keys}), more than shards.max_skip_"
                             f"fraction={self.max_skip_fraction}. Batches would repeat the few complete samples. Fix "
                             "the shard, point caption.key/label.key at the right member, or raise "
                             "shards.max_skip_fraction.")

    def setup(self, stage: str) -> None:
        rank, world = self._world()
        st = self.cfg.stream
        if stage == "fit":
            urls = expand_shards(self.shards["fit"], "shards.train")
            if not st.resampled and len(urls) < world * max(1, st.num_workers):
                raise ShardError(f"shards.train: {len(urls)} shard(s) for {world} rank(s) x "
                                 f"{max(1, st.num_workers)} worker(s): every reader needs its own shard. "
                                 "Re-shard into more files, lower stream.num_workers, or set stream.resampled: true "
                                 "with shards.samples_per_epoch.")
            sizes = self._index(urls, "shards.train")
            total = self._count(urls, sizes, "shards.train")
            n_batches = batches_per_rank(total, world, st.batch_size, st.drop_last)
            if n_batches == 0:
                raise ShardError(f"shards.train: {total} samples cannot fill one batch of {st.batch_size} "
                                 f"on each of {world} rank(s). Lower stream.batch_size or add data.")
            self._train = StreamingDataset(
                urls, self._decode_train, self.collate, st.batch_size, n_batches, sizes=sizes,
                shuffle_buffer=st.shuffle_buffer, seed=st.seed, resampled=st.resampled,
                rank=rank, world_size=world, max_skip_fraction=self.max_skip_fraction, epoch_samples=total)
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
            ds = InMemoryDataset(urls, self._decode_eval, self.cfg.eval.max_samples, sizes)
            if len(ds) < world:  # a rank without a sample has no metric to synchronise: the others would hang
                raise ShardError(f"{what}: {len(ds)} evaluation sample(s) for {world} ranks; every rank needs at "
                                 "least one. Evaluate on fewer devices, add samples, or raise eval.max_samples.")
            self._eval[split] = ds
            self.health.add(self._stage_name(split), ds.load_report)

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
            raise RuntimeError("train_dataloader() before setup('fit'): no shards.train were set up.")
        st = self.cfg.stream
        loader = StreamingLoader(self._train, epoch_fn=self._epoch,
                                 progress_fn=self._progress if self.trainer is not None else None,
                                 health=self.health, num_workers=st.num_workers, pin_memory=st.pin_memory,
                                 persistent_workers=st.persistent_workers, owner_restores=True)
        if self._stream_state is not None:
            loader.restore(self._stream_state)
        self._train_loader = loader
        return loader

    # ---- resume -------------------------------------------------------------------------------
    # The position within an epoch travels in the checkpoint as the datamodule's state: Lightning
    # restores it before it builds the train loader (the loader's own state would be restored too
    # late when ``configure_optimizers`` already counted batches through it) and before it restores
    # its own loops, which is what lets a changed stream set the loop's batch counter it will resume.
    def state_dict(self) -> dict:
        loader = getattr(self, "_train_loader", None)
        return {"stream": loader.position()} if loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._stream_state = state.get("stream")
        if not self._stream_state or self._train is None:
            return
        shape = self._train.shape(max(1, self.cfg.stream.num_workers))
        plan = plan_resume(self._stream_state, shape)
        if plan.kind == "exact":
            return
        if plan.note and shape.rank == 0:
            print(plan.note, file=sys.stderr)
        self._set_loop_batches(int(self._stream_state.get("batches", 0)), plan.batches)
        # from here on the position is one of the current stream: the loader restores it exactly
        self._stream_state = {"epoch": self._stream_state.get("epoch"), "batches": plan.batches,
                              "workers": {w: list(p) for w, p in plan.workers.items()}, "shape": asdict(shape),
                              "health": self._stream_state.get("health", {})}

    def _set_loop_batches(self, saved: int, now: int) -> None:
        """Move the training loop's batch counter of the interrupted epoch to ``now`` (the stream's
        position in the current batch size), in the checkpoint Lightning is about to restore its loops
        from; shifting every field by the same amount keeps the loop's restart stage as it was."""
        connector = getattr(self.trainer, "_checkpoint_connector", None) if self.trainer is not None else None
        loaded = getattr(connector, "_loaded_checkpoint", None) or {}
        current = loaded.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {}).get("current")
        if current is None:
            raise RuntimeError("resume: the checkpoint holds no training-loop progress to move to the changed "
                               "stream's position (a Lightning version with another checkpoint layout?).")
        for key in ("ready", "started", "processed", "completed"):
            current[key] = max(-1, int(current[key]) + now - saved)

    def _eval_loader(self, split: str):
        if split not in self._eval:
            return []
        ds = self._eval[split]
        rank, world = self._world()
        st = self.cfg.stream
        return EvalLoader(ds, self.collate, self._stage_name(split), self.health, batch_size=self.eval_batch_size,
                          sampler=UnpaddedDistributedSampler(ds, world, rank), num_workers=st.num_workers,
                          pin_memory=st.pin_memory, persistent_workers=st.persistent_workers)

    def val_dataloader(self):
        if len(self.val_names) == 1:
            return self._eval_loader("validate")
        return [self._eval_loader("validate")] + [self._eval_loader(f"validate:{n}") for n in self.val_names[1:]]

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        """``shards.predict`` when configured; else the model's own ``predict_dataloader`` (a generative
        model makes its own inputs, e.g. class labels to sample); else ``shards.test``."""
        if "predict" in self._eval:
            return self._eval_loader("predict")
        model = self.trainer.lightning_module if self.trainer is not None else None
        own = getattr(type(model), "predict_dataloader", None) if model is not None else None
        if own is not None and own is not pl.LightningModule.predict_dataloader:
            return model.predict_dataloader()
        if self.shards.get("test") is None:
            raise ShardError("predict: set data.init_args.shards.predict (or shards.test) to the shards to predict on "
                             f"({type(model).__name__ if model is not None else 'this model'} makes no inputs of its "
                             "own).")
        self.shards["predict"] = self.shards["test"]
        self.setup("predict")
        return self._eval_loader("predict")


def _strings(value: Any, key: str = ""):
    """``(dotted key, text)`` for every string inside nested mappings and lists."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")

