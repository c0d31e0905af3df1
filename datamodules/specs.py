"""The options of the datamodules, grouped by concern into small frozen dataclasses.

``StreamingDataModule(shards, stream, eval, generate, preprocess)`` plus one small spec per modality
(``label``, ``caption``, ``image``, ``audio``). Each spec checks its own values in ``__post_init__``
(the error names the field, the bad value and what is allowed), so a zero batch size or a negative
worker count fails when the config is parsed, not inside torch. In YAML every spec is a nested
mapping under ``data.init_args``, e.g. ``--data.init_args.stream.batch_size=32``.

Plain stdlib: importable without Lightning (the TTA streams and the tests build them directly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmalign.specs import need, one_of, positive, unit_interval

ShardList = str | list[str] | None

#: the built-in datasets ``generate`` can write (``datamodules.generate.GENERATORS``)
GENERATED = ("shapes", "digits", "spoken")
#: split names an extra validation set may not take (they name the stages themselves)
RESERVED_VAL_NAMES = ("val", "fit", "validate", "test", "predict")


def _check_list(name: str, value: ShardList) -> None:
    if value is None:
        return
    items = [value] if isinstance(value, str) else list(value)
    need(bool(items) and all(isinstance(s, str) and s.strip() for s in items),
         f"{name} must be a non-empty shard spec (a directory, brace pattern, glob, list of paths or 'pipe:' "
         f"command) or null, got {value!r}.")


def _check_count(name: str, value: Any, allow_none: bool = True, zero: bool = False) -> None:
    need(value is None or (isinstance(value, int) and not isinstance(value, bool)),
         f"{name} must be a whole number{' or null' if allow_none else ''}, got {value!r}.")
    positive(name, value, allow_none=allow_none, zero=zero)


@dataclass(frozen=True)
class ShardsSpec:
    """Where the samples are, and how much of them make an epoch.

    Args:
        data_root: Directory that relative local shard specs are resolved against.
        train: Training shards: a directory, brace pattern, glob, list, image folder, or ``pipe:``
            command (``pipe:`` runs a shell command and reads its output: only put commands you
            would run yourself here; a checkpoint's recorded ``pipe:`` spec is never run).
        val: Validation shards (loaded into memory, every sample evaluated once).
        test: Test shards (same as validation).
        predict: Shards for ``predict`` (default: ``test``). Models that make their own inputs
            (REPA's class labels) need none.
        extra_val: More named validation sets, e.g. ``{heldout: shapes/heldout}``; each gets its
            own dataloader and its metrics are logged under its name (the main one is ``val``).
        samples_per_epoch: Global samples per epoch. Required for ``pipe:``/remote shards without a
            ``sizes.json`` and for ``stream.resampled``; otherwise counted from the shards.
        validate: Index local shards at set-up: counts, required members, label range.
        max_skip_fraction: Largest fraction of unusable samples (corrupt, or lacking a required
            member) a shard or reader may have before set-up or training stops with an error;
            below it, skipped samples are counted and reported.
    """

    data_root: str | None = None
    train: ShardList = None
    val: ShardList = None
    test: ShardList = None
    predict: ShardList = None
    extra_val: dict[str, str | list[str]] | None = None
    samples_per_epoch: int | None = None
    validate: bool = True
    max_skip_fraction: float = 0.5

    def __post_init__(self) -> None:
        need(self.data_root is None or (isinstance(self.data_root, str) and self.data_root.strip()),
             f"shards.data_root must be a directory or null, got {self.data_root!r}.")
        for split in ("train", "val", "test", "predict"):
            _check_list(f"shards.{split}", getattr(self, split))
        need(self.extra_val is None or isinstance(self.extra_val, dict),
             f"shards.extra_val must map names to shard specs, got {self.extra_val!r}.")
        for name, spec in (self.extra_val or {}).items():
            need(name not in RESERVED_VAL_NAMES,
                 f"shards.extra_val: '{name}' is reserved ({list(RESERVED_VAL_NAMES)}); pick another name.")
            need(spec is not None, f"shards.extra_val.{name} must be a shard spec, got null.")
            _check_list(f"shards.extra_val.{name}", spec)
        _check_count("shards.samples_per_epoch", self.samples_per_epoch)
        unit_interval("shards.max_skip_fraction", self.max_skip_fraction, closed_top=True)


@dataclass(frozen=True)
class StreamSpec:
    """How the training stream is read: per-process batch size, reader processes, shuffling.

    Args:
        batch_size: Per-process batch size.
        num_workers: DataLoader worker processes per rank (0 = read in the training process).
        shuffle_buffer: Samples held in the seeded shuffle buffer of each reader (1 = none).
        seed: Seed of shard order and shuffle buffer (combined with epoch, rank and worker).
        resampled: Draw shards with replacement; needs ``shards.samples_per_epoch``. Use it when there
            are fewer shards than ranks x workers, or for endless LAION-style streams.
        drop_last: Drop the final partial global batch of an epoch (else round up and repeat).
        pin_memory: Pin host memory of batches (useful on GPU).
        persistent_workers: Keep the worker processes alive between epochs (saves their start-up
            each epoch; the epoch seed and resume position still reach them).
    """

    batch_size: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    resampled: bool = False
    drop_last: bool = True
    pin_memory: bool = False
    persistent_workers: bool = False

    def __post_init__(self) -> None:
        _check_count("stream.batch_size", self.batch_size, allow_none=False)
        _check_count("stream.num_workers", self.num_workers, allow_none=False, zero=True)
        _check_count("stream.shuffle_buffer", self.shuffle_buffer, allow_none=False)
        _check_count("stream.seed", self.seed, allow_none=False, zero=True)
        need(not (self.persistent_workers and self.num_workers == 0),
             "stream.persistent_workers: true needs stream.num_workers >= 1 (there are no worker processes to keep).")


@dataclass(frozen=True)
class EvalSpec:
    """Validation, test and predict sets (held in memory, every sample once).

    Args:
        batch_size: Per-process evaluation batch size (null: ``stream.batch_size``).
        max_samples: Cap on samples loaded per evaluation split (null: all).
    """

    batch_size: int | None = None
    max_samples: int | None = None

    def __post_init__(self) -> None:
        _check_count("eval.batch_size", self.batch_size)
        _check_count("eval.max_samples", self.max_samples)


@dataclass(frozen=True)
class GenerateSpec:
    """A built-in dataset written on first use when the configured split folders do not exist.

    Args:
        name: ``shapes``, ``digits`` or ``spoken``. The shard specs must then be
            ``<root>/<split>`` folders with ``<root>`` named after the dataset.
        kwargs: Arguments of the generator (``num_train``, ``image_size``, ``shard_size``, ``seed``...).
    """

    name: Literal["shapes", "digits", "spoken"] = "shapes"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        one_of("generate.name", self.name, GENERATED)
        need(isinstance(self.kwargs, dict), f"generate.kwargs must be a mapping, got {self.kwargs!r}.")
        import inspect

        from .generate import generator_function

        params = inspect.signature(generator_function(self.name)).parameters
        allowed = sorted(p for p in params if p != "root")
        for key, value in self.kwargs.items():
            need(key in allowed, f"generate.kwargs: '{key}' is not an option of the '{self.name}' generator; "
                                 f"allowed: {allowed}.")
            if key.startswith("num_") or key in ("shard_size", "image_size", "sample_rate"):
                _check_count(f"generate.kwargs.{key}", value, allow_none=False,
                             zero=key.startswith("num_") and key not in ("num_train",))
            elif key == "max_seconds":
                positive(f"generate.kwargs.{key}", value)


def as_generate(value: GenerateSpec | dict | str | None) -> GenerateSpec | None:
    """``generate: digits`` is short for ``generate: {name: digits}``."""
    from mmalign.specs import coerce

    if value is None or isinstance(value, GenerateSpec):
        return value
    if isinstance(value, str):
        return GenerateSpec(name=value)  # type: ignore[arg-type]
    return coerce(value, GenerateSpec, "generate")


@dataclass(frozen=True)
class LabelSpec:
    """Where a sample's class index is and what it may be.

    Args:
        key: ``cls`` to read the ``.cls`` member, or the name of a field of the ``.json`` member.
        num_classes: When set, every label is checked against ``[0, num_classes)`` (at set-up for
            indexed local shards, else when a sample is decoded); normally linked from the model.
        classes: A class-index file for labels written as names (``"cat"``, a class folder's name, an
            ImageNet wnid): a JSON list of names (index = position), a JSON mapping name -> index, a
            class-spec JSON (``{"classnames": [...]}``) or a text file with one name per line (its first
            word). Null: labels must be numbers, and a folder's classes are its sorted sub-folders.
    """

    key: str = "cls"
    num_classes: int | None = None
    classes: str | None = None

    def __post_init__(self) -> None:
        need(isinstance(self.key, str) and bool(self.key.strip()), f"label.key must name a member or json field, "
                                                                   f"got {self.key!r}.")
        _check_count("label.num_classes", self.num_classes)


@dataclass(frozen=True)
class ImageSpec:
    """Images when the model hands no transform over.

    Args:
        size: Side of the default transform's output.
    """

    size: int = 64

    def __post_init__(self) -> None:
        _check_count("image.size", self.size, allow_none=False)


@dataclass(frozen=True)
class CaptionSpec:
    """Where a sample's caption is.

    Args:
        key: ``txt`` for the ``.txt`` member, or ``json:<field>`` to take it from the json.
    """

    key: str = "txt"

    def __post_init__(self) -> None:
        need(self.key == "txt" or (self.key.startswith("json:") and len(self.key) > 5),
             f"caption.key must be 'txt' or 'json:<field>', got {self.key!r}.")


@dataclass(frozen=True)
class AudioSpec:
    """Clips: the rate they are resampled to, and what makes one unusable (skipped and counted).

    Args:
        sample_rate: Rate every clip is resampled to (Hz).
        max_seconds: Longest clip accepted.
        silence_threshold: Peak amplitude under which a clip counts as silent.
    """

    sample_rate: int = 16000
    max_seconds: float = 10.0
    silence_threshold: float = 1e-4

    def __post_init__(self) -> None:
        _check_count("audio.sample_rate", self.sample_rate, allow_none=False)
        positive("audio.max_seconds", self.max_seconds)
        positive("audio.silence_threshold", self.silence_threshold, zero=True)


#: the flat options of the older ``StreamingDataModule`` and where they live now
BASE_MOVED = {
    "data_root": "shards.data_root", "train_shards": "shards.train", "val_shards": "shards.val",
    "test_shards": "shards.test", "predict_shards": "shards.predict", "extra_val_shards": "shards.extra_val",
    "samples_per_epoch": "shards.samples_per_epoch", "validate_shards": "shards.validate",
    "max_skip_fraction": "shards.max_skip_fraction",
    **{k: f"stream.{k}" for k in ("batch_size", "num_workers", "shuffle_buffer", "seed", "resampled", "drop_last",
                                  "pin_memory")},
    "eval_batch_size": "eval.batch_size", "max_eval_samples": "eval.max_samples",
    "generate_kwargs": "generate.kwargs",
}
