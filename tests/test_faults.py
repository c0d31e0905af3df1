"""The reliability probe: bad inputs and faults across the datamodules, fit, adapt and zeroshot.

Every case asserts the message names the problem (and, where there is one, the fix). The table
``FAULTS`` holds the cases that are a single call; the tests below it cover faults that need a
run (resume, interrupted writes, remote checkpoints, kill -9).
"""

from __future__ import annotations

import builtins
import os
import re

import pytest
import torch

from datamodules import ImageLabelDataModule, ImageTextDataModule, ShardError, expand_shards
from datamodules.health import DataHealthError
from datamodules.stream import DataConfigError, StreamingDataset, StreamingLoader
from tests._data import png_bytes, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs/classify/digits.yaml")
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
         "--data.init_args.stream.num_workers=0",
         "--trainer.enable_model_summary=false"]
TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8}


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def crafted(path, marker, **extra) -> str:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"model_name": "resnet18"},
                "payload": _RunsCode(str(marker)), **extra}, str(path))
    return str(path)


def _tar(path, samples):
    from webdataset import TarWriter

    with TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def _tiny_classifier_ckpt(path, num_classes=10):
    import lightning

    from mmalign.classify import ImageClassifier

    m = ImageClassifier({"name": "resnet18", "kwargs": TINY_RESNET}, num_classes=num_classes, transform={"image_size": 32})
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                "pytorch-lightning_version": lightning.__version__}, str(path))
    return str(path)


# ---- single-call faults: (id, function(tmp_path, data_root), exception, message regex) -------------

def _setup(dm, stage="fit"):
    dm.setup(stage)
    return dm


def _read_all(dm):
    dm.setup("fit")
    return list(dm.train_dataloader())


def f_garbage_tar(t, d):
    (t / "x.tar").write_bytes(b"this is not a tar archive" * 40)
    return _setup(ImageTextDataModule(shards={"train": str(t)}, stream={"num_workers": 0}))


def f_no_images(t, d):
    write_shards(str(t), [3, 3], with_image=False)
    return _setup(ImageTextDataModule(shards={"train": str(t)}, stream={"num_workers": 0, "batch_size": 2}))


def f_mostly_no_caption(t, d):
    _tar(t / "a.tar", [{"__key__": f"k{i}", "png": png_bytes(i), **({"txt": "c"} if i < 2 else {})} for i in range(20)])
    return _setup(ImageTextDataModule(shards={"train": str(t)}, stream={"num_workers": 0, "batch_size": 2}))


def f_mostly_no_label(t, d):
    _tar(t / "a.tar", [{"__key__": f"k{i}", "png": png_bytes(i), "json": {"other": 1}} for i in range(10)])
    return _setup(ImageLabelDataModule(shards={"train": str(t)}, stream={"num_workers": 0, "batch_size": 2},
                                       label={"key": "shape_id"}))


def f_empty_shard(t, d):
    write_shards(str(t), [3, 0])
    return _setup(ImageTextDataModule(shards={"train": str(t)}, stream={"num_workers": 0, "batch_size": 2}))


def f_label_range(t, d):
    write_shards(str(t), [4, 4], label_of=lambda n: 7 if n == 5 else 1)
    return _setup(ImageLabelDataModule(shards={"train": str(t)}, stream={"num_workers": 0, "batch_size": 2},
                                       label={"num_classes": 5}))


def f_too_few_shards(t, d):
    write_shards(str(t), [8, 8])
    return _setup(ImageTextDataModule(shards={"train": str(t)}, stream={"num_workers": 3, "batch_size": 2}))


def f_batch_too_big(t, d):
    write_shards(str(t), [3])
    return _setup(ImageTextDataModule(shards={"train": str(t)}, stream={"num_workers": 0, "batch_size": 64}))


def f_typo_with_generate(t, d):
    return ImageLabelDataModule(shards={"data_root": str(t), "train": "digitz/train"}, generate="digits").prepare_data()


def f_bad_split_with_generate(t, d):
    return ImageLabelDataModule(shards={"data_root": str(t), "train": "digits/trian"}, generate="digits").prepare_data()


def f_remote_unsized(t, d):
    [p] = write_shards(str(t), [4])
    return _setup(ImageTextDataModule(shards={"train": f"pipe:cat {p}", "validate": False},
                                      stream={"num_workers": 0, "batch_size": 2}))


def f_mostly_corrupt_stream(t, d):
    write_shards(str(t), [40, 40], corrupt={f"k{i:05d}" for i in range(80) if i % 10})
    return _read_all(ImageTextDataModule(shards={"train": str(t)}, stream={"batch_size": 4, "num_workers": 0},
                                         image={"size": 8}))


def f_incomplete_generated(t, d):
    (t / "digits").mkdir()
    (t / "digits" / "junk.txt").write_text("half a dataset")
    return ImageLabelDataModule(shards={"data_root": str(t), "train": "digits/train"}, generate="digits").prepare_data()


def f_predict_nothing(t, d):
    dm = ImageLabelDataModule(stream={"num_workers": 0})
    dm.setup("predict")
    return dm.predict_dataloader()


def f_persistent_workers(t, d):
    return ImageTextDataModule(stream={"persistent_workers": True, "num_workers": 0})


def f_crafted_weights(t, d):
    from mmalign.models.weights import read_state_dict

    return read_state_dict(crafted(t / "w.pt", t / "RAN"))


def f_crafted_tta_source(t, d):
    from mmalign.tta.module import TTAModel

    return TTAModel(crafted(t / "src.ckpt", t / "RAN"), methods=["source"])


def f_crafted_cafa_stats(t, d):
    from mmalign.tta.cafa_stats import SourceStats

    return SourceStats.load(crafted(t / "stats.pt", t / "RAN"))


def f_crafted_open_clip_teacher(t, d):
    from mmalign.encoders import build_teacher

    return build_teacher("open_clip", "not-a-registered-model", crafted(t / "clip.ckpt", t / "RAN"))


def f_crafted_resume(t, d):
    from mmalign.training.checkpointing import AtomicCheckpointIO

    return AtomicCheckpointIO().load_checkpoint(crafted(t / "last.ckpt", t / "RAN"))


def f_missing_weights(t, d):
    from mmalign.models.timm_models import create_timm_model

    return create_timm_model("resnet18", 10, checkpoint_path=str(t / "nope.pth"), **TINY_RESNET)


def f_wrong_architecture(t, d):
    from mmalign.models.timm_models import create_timm_model

    torch.save({"conv1.weight": torch.zeros(3, 3, 3, 3)}, str(t / "other.pth"))
    return create_timm_model("resnet18", 10, checkpoint_path=str(t / "other.pth"), **TINY_RESNET)


def f_unknown_timm(t, d):
    from mmalign.classify import ImageClassifier

    return ImageClassifier({"name": "resnet1888"})


def f_unknown_open_clip(t, d):
    from mmalign.contrastive import CLIP

    return CLIP(model={"name": "ViT-B-33"})


def f_tta_labels_exceed_classes(t, d):
    from mmalign.tta.module import TTAModel
    from mmalign.tta.pipeline import adapt
    from mmalign.tta.stream import CorruptionStream

    model = TTAModel(_tiny_classifier_ckpt(t / "src6.ckpt", num_classes=6), methods=["source", "tent"])
    stream = CorruptionStream(shards={"data_root": d, "test": "digits/test"},
                              stream={"num_workers": 0, "batch_size": 32},
                              benchmark={"dir": str(t / "dc"), "corruptions": ["fog"]}, preprocess=model.preprocess)
    stream.prepare_data()
    stream.setup("test")
    return adapt(model, stream, max_batches=1, out_dir=str(t), log=lambda s: None)


def f_tta_num_classes_disagree(t, d):
    from mmalign.tta.module import TTAModel
    from mmalign.tta.pipeline import check_labels_fit
    from mmalign.tta.stream import CorruptionStream

    model = TTAModel(_tiny_classifier_ckpt(t / "src.ckpt"), methods=["source"])
    return check_labels_fit(model, CorruptionStream(label={"num_classes": 36}, benchmark={"dir": str(t)}))


def f_tta_bad_method(t, d):
    from mmalign.tta.module import TTAModel

    return TTAModel(None, "resnet18", 10, TINY_RESNET, methods=["source", "tnet"])


def f_tta_bad_corruption(t, d):
    from mmalign.tta.stream import CorruptionStream

    return CorruptionStream(benchmark={"dir": str(t), "corruptions": ["gaussian_nois"]})


def f_cafa_stats_other_checkpoint(t, d):
    from mmalign.tta.cafa_stats import SourceStats
    from mmalign.tta.module import TTAModel
    from mmalign.tta.pipeline import source_statistics

    stats = SourceStats(torch.zeros(10, 8), torch.eye(8), torch.ones(10), "shared", 0.1, {"num_samples": 10},
                        {"path": "/elsewhere/other.ckpt", "sha256": "0" * 64})
    stats.save(str(t / "given.cafa_stats.pt"))
    model = TTAModel(_tiny_classifier_ckpt(t / "src.ckpt"), methods=["cafa"], cafa_stats=str(t / "given.cafa_stats.pt"))
    return source_statistics(model, None, str(t), "cpu", log=lambda s: None)


def f_zeroshot_bad_labels(t, d):
    from tests.test_contrastive_module import tiny

    m = tiny(eval={"zeroshot_classes": os.path.join(d, "shapes", "classes_shape.json"), "label_field": "combo_id"})
    m.start_eval(["val"])
    batch = {"image": torch.randn(2, 3, 16, 16), "meta": [{"combo_id": 30}, {"combo_id": 1}]}
    return m._eval_step(batch, "val")


def f_repa_no_teacher(t, d):
    from mmalign.repa import FlowMatchingDiffusion

    return FlowMatchingDiffusion(align={"mode": "repa"})


def f_speech_consistency_alone(t, d):
    from mmalign.speech import SpeechTextAligner

    return SpeechTextAligner(losses={"contrastive_weight": 0.0, "ctc_weight": 0.0, "consistency_weight": 1.0})


FAULTS = [
    ("empty shard list", lambda t, d: expand_shards([]), ShardError, "shard list is empty"),
    ("missing shard", lambda t, d: expand_shards(str(t / "none.tar")), ShardError, "1 shard path.* do not exist"),
    ("missing brace range", lambda t, d: expand_shards(str(t / "x-{0..3}.tar")), ShardError, "4 shard path"),
    ("dir without shards", lambda t, d: expand_shards(str(t)), ShardError, "holds no \\*.tar shards"),
    ("garbage tar", f_garbage_tar, ShardError, "not a readable tar file.*Re-create or remove it"),
    ("shard without images", f_no_images, ShardError, "no sample with a .jpg/.jpeg/.png/.webp/.bmp/.ppm member"),
    ("most samples lack a caption", f_mostly_no_caption, ShardError, "18 of the 20 samples .* lack a required member"),
    ("label field no sample has", f_mostly_no_label, DataConfigError, "no json field 'shape_id'.*fields seen: \\['other'\\]"),
    ("empty shard", f_empty_shard, ShardError, "holds no samples"),
    ("label outside num_classes", f_label_range, DataConfigError, r"label 7 is outside \[0, 5\).*num_classes"),
    ("too few shards for readers", f_too_few_shards, ShardError, "every reader needs its own shard"),
    ("batch larger than data", f_batch_too_big, ShardError, "cannot fill one batch"),
    ("batch_size 0", lambda t, d: ImageTextDataModule(stream={"batch_size": 0}), ValueError,
     "stream.batch_size must be > 0, got 0"),
    ("negative workers", lambda t, d: ImageTextDataModule(stream={"num_workers": -1}), ValueError,
     "stream.num_workers must be >= 0, got -1"),
    ("resampled without length", lambda t, d: ImageTextDataModule(stream={"resampled": True}), ValueError,
     "needs shards.samples_per_epoch"),
    ("unknown generator", lambda t, d: ImageTextDataModule(generate="shpaes"), ValueError,
     r"generate.name must be one of \['shapes', 'digits', 'spoken'\], got 'shpaes'"),
    ("typo'd path with generation on", f_typo_with_generate, ShardError, "looks like a typo"),
    ("unknown split with generation on", f_bad_split_with_generate, ShardError, "'trian' is not a split"),
    ("bad caption_key", lambda t, d: ImageTextDataModule(caption={"key": "caption"}), ValueError,
     "caption.key must be 'txt' or 'json:<field>'"),
    ("remote shard, no sizes", f_remote_unsized, ShardError, "cannot count samples.*samples_per_epoch"),
    ("reserved extra val name", lambda t, d: ImageTextDataModule(shards={"extra_val": {"val": "x"}}), ValueError,
     "reserved"),
    ("max_skip_fraction > 1", lambda t, d: ImageTextDataModule(shards={"max_skip_fraction": 2.0}), ValueError,
     "max_skip_fraction must be in"),
    ("mostly corrupt stream", f_mostly_corrupt_stream, DataHealthError, "were unusable, more than max_skip_fraction"),
    ("half-generated dataset", f_incomplete_generated, FileExistsError, "holds no complete generated dataset"),
    ("predict without shards", f_predict_nothing, ShardError, "set data.init_args.shards.predict \\(or shards.test\\)"),
    ("persistent workers, no workers", f_persistent_workers, ValueError,
     "persistent_workers: true needs stream.num_workers >= 1"),
    ("crafted weights file", f_crafted_weights, ValueError, "refusing to load .*weights_only=True"),
    ("crafted TTA source checkpoint", f_crafted_tta_source, ValueError, "refusing to load .*src.ckpt"),
    ("crafted CAFA statistics", f_crafted_cafa_stats, ValueError, "refusing to load .*stats.pt"),
    ("crafted open_clip teacher checkpoint", f_crafted_open_clip_teacher, ValueError, "refusing to load .*clip.ckpt"),
    ("crafted resume checkpoint", f_crafted_resume, ValueError, "refusing to load .*last.ckpt"),
    ("missing weights file", f_missing_weights, FileNotFoundError, "does not exist.*no download"),
    ("weights of another architecture", f_wrong_architecture, ValueError, "does not fit .*shape mismatch|missing"),
    ("unknown timm model", f_unknown_timm, ValueError, "unknown timm model 'resnet1888'.*Close matches"),
    ("unknown open_clip model", f_unknown_open_clip, ValueError, "ViT-B-33"),
    ("adapt: labels exceed the model's classes", f_tta_labels_exceed_classes, DataConfigError,
     r"label \d+ is outside \[0, 6\)"),
    ("adapt: num_classes disagrees", f_tta_num_classes_disagree, ValueError, "num_classes=36 but the source model has 10"),
    ("adapt: unknown method", f_tta_bad_method, ValueError, "'tnet'"),
    ("adapt: unknown corruption", f_tta_bad_corruption, ValueError, "gaussian_nois"),
    ("adapt: CAFA statistics of another checkpoint", f_cafa_stats_other_checkpoint, ValueError,
     "were computed from /elsewhere/other.ckpt"),
    ("zeroshot: label outside the classes", f_zeroshot_bad_labels, ValueError, "label 30 .* outside the 6 classes"),
    ("REPA without teacher", f_repa_no_teacher, ValueError, "needs a teacher"),
    ("speech consistency loss alone", f_speech_consistency_alone, ValueError, "admits collapse"),
]


@pytest.mark.parametrize("fn,exc,pattern", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_fault_is_named(fn, exc, pattern, tmp_path, data_root):
    with pytest.raises(exc) as info:
        fn(tmp_path, data_root)
    assert re.search(pattern, str(info.value), re.S), str(info.value)
    assert not (tmp_path / "RAN").exists(), "a crafted checkpoint ran code"


# ---- CLI faults ------------------------------------------------------------------------------------

def run_cli(*args):
    from mmalign import cli

    return cli.main(list(args))


@pytest.mark.parametrize("arg,needle", [("--model.init_args.lrr=1", "which moved to 'optim.lr'"),
                                        ("--model.init_args.optim.lrr=1", "Did you mean 'optim.lr'"),
                                        ("--model.init_args.num_classes=abc", "num_classes"),
                                        ("--data.init_args.shuffle_bufer=3", "which moved to 'stream.shuffle_buffer'")])
def test_config_error_printed_once_last_without_dump(in_tmp, capsys, arg, needle):
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", DIGITS, arg)
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("error:") == 1 and err.splitlines()[-1].startswith("error:")
    assert "Given value" not in err and "Namespace(" not in err and len(err.splitlines()) <= 3


def test_constructor_error_raised_as_itself_not_a_union_dump(in_tmp):
    """A model constructor's own error (here a missing weights file, checked before anything is built)
    reaches the user as that exception, not jsonargparse's Union error with a dump of every option."""
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        run_cli("fit", "-c", DIGITS, "--model.init_args.network.checkpoint_path=missing/weights.pth",
                "--trainer.max_steps=1")
    assert "Namespace(" not in str(info.value) and "Union" not in str(info.value)
    assert not os.path.exists("runs/mmalign/version_0")
