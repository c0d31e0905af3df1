"""The datamodules' grouped options (datamodules/specs.py): each value checked by name at construction, and
every older flat key sent to its new place (by the CLI's error, and by ``migrate_flat`` for Python callers)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from datamodules import AudioTextDataModule, ImageLabelDataModule, ImageTextDataModule, StreamingDataModule
from datamodules.specs import AudioSpec, EvalSpec, GenerateSpec, ImageSpec, LabelSpec, ShardsSpec, StreamSpec
from mmalign.specs import migrate_flat, moved_option_hint
from mmalign.tta.domains import CorruptionStream, DomainStream, TargetStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = (StreamingDataModule, ImageLabelDataModule, ImageTextDataModule, AudioTextDataModule, DomainStream,
           CorruptionStream, TargetStream)


@pytest.mark.parametrize("spec, kw, pattern", [
    (StreamSpec, {"batch_size": 0}, r"stream.batch_size must be > 0, got 0"),
    (StreamSpec, {"batch_size": -4}, r"stream.batch_size must be > 0, got -4"),
    (StreamSpec, {"num_workers": -1}, r"stream.num_workers must be >= 0, got -1"),
    (StreamSpec, {"shuffle_buffer": 0}, r"stream.shuffle_buffer must be > 0, got 0"),
    (StreamSpec, {"seed": -1}, r"stream.seed must be >= 0"),
    (StreamSpec, {"batch_size": 2.5}, r"stream.batch_size must be a whole number, got 2.5"),
    (StreamSpec, {"persistent_workers": True, "num_workers": 0}, r"needs stream.num_workers >= 1"),
    (ShardsSpec, {"samples_per_epoch": 0}, r"shards.samples_per_epoch must be > 0"),
    (ShardsSpec, {"max_skip_fraction": 1.5}, r"shards.max_skip_fraction must be in \[0, 1\]"),
    (ShardsSpec, {"train": ""}, r"shards.train must be a non-empty shard spec"),
    (ShardsSpec, {"val": []}, r"shards.val must be a non-empty shard spec"),
    (ShardsSpec, {"extra_val": {"test": "x"}}, r"shards.extra_val: 'test' is reserved"),
    (EvalSpec, {"batch_size": 0}, r"eval.batch_size must be > 0"),
    (EvalSpec, {"max_samples": -2}, r"eval.max_samples must be > 0"),
    (GenerateSpec, {"name": "shpaes"}, r"generate.name must be one of"),
    (GenerateSpec, {"name": "digits", "kwargs": {"num_train": 5}}, r"'num_train' is not an option of the 'digits'"),
    (GenerateSpec, {"name": "shapes", "kwargs": {"num_train": 0}}, r"generate.kwargs.num_train must be > 0"),
    (GenerateSpec, {"name": "shapes", "kwargs": {"shard_size": -1}}, r"generate.kwargs.shard_size must be > 0"),
    (LabelSpec, {"num_classes": 0}, r"label.num_classes must be > 0"),
    (ImageSpec, {"size": 0}, r"image.size must be > 0"),
    (AudioSpec, {"sample_rate": 0}, r"audio.sample_rate must be > 0"),
    (AudioSpec, {"max_seconds": -1.0}, r"audio.max_seconds must be > 0"),
])
def test_every_size_and_count_is_refused_by_name(spec, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        spec(**kw)


def test_a_datamodule_takes_specs_or_mappings_and_checks_across_them():
    dm = ImageLabelDataModule(shards={"train": "x"}, stream=StreamSpec(batch_size=3), generate="digits",
                              label={"num_classes": 3})
    assert dm.cfg.stream.batch_size == 3 and dm.cfg.generate == GenerateSpec("digits") and dm.num_classes == 3
    dm.num_classes = 5  # the TTA pipeline hands the model's class count over; the spec stays validated
    assert dm.cfg.label == LabelSpec(num_classes=5)
    with pytest.raises(ValueError, match="label.num_classes must be > 0"):
        dm.num_classes = 0
    with pytest.raises(ValueError, match=r"stream.resampled: true needs shards.samples_per_epoch"):
        ImageTextDataModule(stream={"resampled": True})
    with pytest.raises(ValueError, match=r"stream: unknown option\(s\) \['batchsize'\]"):
        ImageTextDataModule(stream={"batchsize": 3})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_class_has_ten_arguments_at_most_and_every_moved_key_lands_on_a_field(cls):
    import inspect
    import typing

    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert len(params) <= 10 and not any(p in ("args", "kwargs") for p in params), params
    hints = typing.get_type_hints(cls.__init__)
    for old, new in cls.moved_options.items():
        group, leaf = new.split(".")
        assert group in params, (old, new)
        spec = next(a for a in typing.get_args(hints[group]) + (hints[group],) if dataclasses.is_dataclass(a))
        assert leaf in {f.name for f in dataclasses.fields(spec)}, (old, new)
        assert old not in params or old == group, f"{old} is still an argument"


def test_an_older_flat_mapping_migrates_to_the_groups():
    flat = {"train_shards": "a", "batch_size": 8, "num_workers": 0, "label_key": "shape_id", "num_classes": 6,
            "image_size": 16, "generate": "shapes"}  # a bare generate name stays valid shorthand
    dm = ImageLabelDataModule(**migrate_flat(ImageLabelDataModule, flat))
    assert dm.cfg.shards.train == "a" and dm.cfg.stream == StreamSpec(batch_size=8, num_workers=0)
    assert dm.cfg.label == LabelSpec(key="shape_id", num_classes=6) and dm.cfg.image.size == 16
    assert dm.cfg.generate == GenerateSpec("shapes")


def test_the_hint_names_the_data_group_and_catches_typos_of_old_keys():
    assert moved_option_hint(ImageLabelDataModule, "train_shards") == (
        "option 'train_shards' moved to 'shards.train' (--data.init_args.shards.train=... or the nested mapping in "
        "YAML)")
    assert "'labels' moved to 'target.labelled'" in moved_option_hint(TargetStream, "labels")
    assert "'domains_dir' moved to 'benchmark.dir'" in moved_option_hint(CorruptionStream, "domains_dir")
    assert "looks like 'batch_size', which moved to 'stream.batch_size'" in moved_option_hint(
        ImageTextDataModule, "batch_sise")


@pytest.mark.parametrize("arg, needle", [
    ("--data.init_args.batch_size=32", "option 'batch_size' moved to 'stream.batch_size' "
                                       "(--data.init_args.stream.batch_size=..."),
    ("--data.init_args.train_shards=digits/train", "option 'train_shards' moved to 'shards.train'"),
    ("--data.init_args.label_key=cls", "option 'label_key' moved to 'label.key'"),
])
def test_cli_names_the_new_place_of_an_old_flat_data_key(in_tmp, capsys, arg, needle):
    from mmalign import cli

    with pytest.raises(SystemExit):
        cli.main(["fit", "-c", os.path.join(ROOT, "configs/classify/digits.yaml"), arg])
    err = capsys.readouterr().err.strip()
    assert needle in err and err.splitlines()[-1].startswith("error:"), err
