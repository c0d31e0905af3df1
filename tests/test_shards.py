import os

import pytest

from datamodules import ImageLabelDataModule, ImageTextDataModule, ShardError, expand_shards
from datamodules.shards import index_shard, iter_tar_samples
from tests._data import write_shards


def test_expand_specs(tmp_path):
    paths = write_shards(str(tmp_path / "d"), [2, 3, 1])
    d = str(tmp_path / "d")
    assert expand_shards(d) == paths
    assert expand_shards(f"{d}/s-{{0000..0002}}.tar") == paths
    assert expand_shards([paths[0], paths[2]]) == [paths[0], paths[2]]
    assert expand_shards(f"{d}/s-000[01].tar") == paths[:2]
    assert expand_shards(f"{paths[0]}::{paths[1]}") == paths[:2]
    assert expand_shards(f"pipe:cat {paths[0]}") == [f"pipe:cat {paths[0]}"]
    keys = [s["__key__"] for s in iter_tar_samples(f"pipe:cat {paths[1]}", [])]
    assert keys == ["k00002", "k00003", "k00004"]


@pytest.mark.parametrize("spec,match", [(None, "empty"), ([], "empty"), ("/nonexistent/x-{0..3}.tar", "4 shard path"),
                                        ("/nonexistent/dir/*.tar", "do not exist")])
def test_bad_specs(spec, match):
    with pytest.raises(ShardError, match=match):
        expand_shards(spec)


def test_index_counts_and_labels(tmp_path):
    [path] = write_shards(str(tmp_path), [4])
    idx = index_shard(path, ("cls",))
    assert idx.num_samples == 4 and idx.ext_counts["png"] == 4 and idx.texts["k00001"]["cls"] == "1"


def test_shard_without_images_fails_at_setup(tmp_path):
    write_shards(str(tmp_path), [3, 3], with_image=False)
    dm = ImageTextDataModule(shards={"train": str(tmp_path)}, stream={"num_workers": 0, "batch_size": 2})
    with pytest.raises(ShardError, match="no sample with a .jpg/.jpeg/.png/.webp/.bmp/.ppm member"):
        dm.setup("fit")


def test_empty_shard_fails_at_setup(tmp_path):
    write_shards(str(tmp_path), [3, 0])
    dm = ImageTextDataModule(shards={"train": str(tmp_path)}, stream={"num_workers": 0, "batch_size": 2})
    with pytest.raises(ShardError, match="holds no samples"):
        dm.setup("fit")


def test_label_out_of_range_fails_at_setup(tmp_path):
    write_shards(str(tmp_path), [4, 4], label_of=lambda n: 7 if n == 5 else 1)
    dm = ImageLabelDataModule(shards={"train": str(tmp_path)}, stream={"num_workers": 0, "batch_size": 2},
                              label={"num_classes": 5})
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 5\).*num_classes"):
        dm.setup("fit")


def test_too_few_shards_for_readers(tmp_path):
    write_shards(str(tmp_path), [8, 8])
    dm = ImageTextDataModule(shards={"train": str(tmp_path)}, stream={"num_workers": 3, "batch_size": 2})
    with pytest.raises(ShardError, match="every reader needs its own shard"):
        dm.setup("fit")
    dm = ImageTextDataModule(shards={"train": str(tmp_path), "samples_per_epoch": 12},
                             stream={"num_workers": 3, "batch_size": 2, "resampled": True})
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 6


def test_generation_on_first_use(tmp_path, caplog):
    dm = ImageLabelDataModule(shards={"data_root": str(tmp_path), "train": "digits/train", "val": "digits/val"},
                              stream={"num_workers": 0, "batch_size": 16},
                              generate={"name": "digits", "kwargs": {"image_size": 16}}, label={"num_classes": 10},
                              image={"size": 16})
    with caplog.at_level("WARNING"):
        dm.prepare_data()
    assert "generating built-in dataset 'digits'" in caplog.text
    assert os.path.isfile(tmp_path / "digits" / "classes.json")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 16, 16) and batch["label"].max() < 10
    assert len(dm.val_dataloader().dataset) == 179


def _folder(root, classes, per_class):
    import numpy as np
    from PIL import Image

    for c in classes:
        d = root / c if c else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(d / f"{c or 'img'}{i}.png")
    return str(root)


def test_image_folder_reads_like_shards(tmp_path):
    from datamodules.folders import folder_shards

    root = _folder(tmp_path / "pets", ["cat", "dog", "emu"], 30)  # 90 images -> 64+ virtual shards
    urls = expand_shards(root)
    assert urls == folder_shards(root) and len(urls) == 45 and urls[0].startswith("folder://")
    dm = ImageLabelDataModule(shards={"train": root, "val": root}, stream={"num_workers": 2, "batch_size": 10},
                              label={"num_classes": 3}, image={"size": 8})
    dm.setup("fit")
    keys, labels = [], []
    for b in dm.train_dataloader():
        keys += b["key"]
        labels += b["label"].tolist()
    # one epoch over 2 readers of 46 and 44 images in 9 batches of 10: each reads its own part
    assert len(keys) == 90 and len(set(keys)) >= 84
    assert {k.split("/")[0]: l for k, l in zip(keys, labels)} == {"cat": 0, "dog": 1, "emu": 2}
    assert sum(len(b["key"]) for b in dm.val_dataloader()) == 90
    with pytest.raises(ValueError, match=r"label 2 is outside \[0, 2\)"):
        ImageLabelDataModule(shards={"train": root}, stream={"num_workers": 0, "batch_size": 10},
                             label={"num_classes": 2}).setup("fit")


def test_unlabelled_image_folder_has_no_labels(tmp_path):
    root = _folder(tmp_path / "raw", [""], 5)
    dm = ImageTextDataModule(shards={"val": root}, stream={"num_workers": 0})
    with pytest.raises(ShardError, match="no sample with a .txt member"):
        dm.setup("validate")  # images but no captions: the wrong datamodule, said at set-up
    from mmalign.tta import TargetStream

    stream = TargetStream(shards={"test": root}, stream={"num_workers": 0, "batch_size": 4}, image={"size": 8})
    assert not stream.labelled and stream.domain_names == ["target"]
    batches = list(stream.domain_batches("target"))
    assert [len(b["key"]) for b in batches] == [4, 1] and set(batches[0]["label"].tolist()) == {-1}


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_fast_tar_reader_agrees_with_tarfile(tmp_path, fmt):
    import io
    import tarfile

    from datamodules.tarfast import TarFormatError, iter_members

    path = tmp_path / "a.tar"
    fmt_id = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]
    long = "d" * 60 + "/" + "x" * (95 if fmt == "ustar" else 150)  # past 100 chars: prefix, PAX or GNU long name
    with tarfile.open(path, "w", format=fmt_id) as tf:
        for i, (name, payload) in enumerate([(f"{long}{0}.png", b"\x89PNG" * 300), ("short.txt", b"hi"),
                                              ("dir/", None), ("big.bin", bytes(range(256)) * 9)]):
            info = tarfile.TarInfo(name.rstrip("/"))
            if payload is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    with tarfile.open(path) as tf:
        want = [(m.name, m.size, tf.extractfile(m).read()) for m in tf if m.isreg()]
    with open(path, "rb") as f:
        got = list(iter_members(f, file_size=os.path.getsize(path)))
    assert got == want
    data = path.read_bytes()
    for cut in (len(data) // 2 // 512 * 512, len(data) // 2 + 100):  # at a block boundary, and inside a block
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with open(tmp_path / "cut.tar", "rb") as f, pytest.raises(TarFormatError):
            list(iter_members(f, file_size=cut))
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    with open(tmp_path / "junk.tar", "rb") as f, pytest.raises(TarFormatError, match="checksum"):
        list(iter_members(f))
