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
    dm = ImageTextDataModule(train_shards=str(tmp_path), num_workers=0, batch_size=2)
    with pytest.raises(ShardError, match="no sample with a .jpg/.jpeg/.png/.webp member"):
        dm.setup("fit")


def test_empty_shard_fails_at_setup(tmp_path):
    write_shards(str(tmp_path), [3, 0])
    dm = ImageTextDataModule(train_shards=str(tmp_path), num_workers=0, batch_size=2)
    with pytest.raises(ShardError, match="holds no samples"):
        dm.setup("fit")


def test_label_out_of_range_fails_at_setup(tmp_path):
    write_shards(str(tmp_path), [4, 4], label_of=lambda n: 7 if n == 5 else 1)
    dm = ImageLabelDataModule(train_shards=str(tmp_path), num_workers=0, batch_size=2, num_classes=5)
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 5\).*num_classes"):
        dm.setup("fit")


def test_too_few_shards_for_readers(tmp_path):
    write_shards(str(tmp_path), [8, 8])
    dm = ImageTextDataModule(train_shards=str(tmp_path), num_workers=3, batch_size=2)
    with pytest.raises(ShardError, match="every reader needs its own shard"):
        dm.setup("fit")
    dm = ImageTextDataModule(train_shards=str(tmp_path), num_workers=3, batch_size=2, resampled=True,
                             samples_per_epoch=12)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 6


def test_generation_on_first_use(tmp_path, caplog):
    dm = ImageLabelDataModule(data_root=str(tmp_path), train_shards="digits/train", val_shards="digits/val",
                              generate="digits", num_workers=0, batch_size=16, num_classes=10,
                              generate_kwargs={"image_size": 16}, image_size=16)
    with caplog.at_level("WARNING"):
        dm.prepare_data()
    assert "generating built-in dataset 'digits'" in caplog.text
    assert os.path.isfile(tmp_path / "digits" / "classes.json")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 16, 16) and batch["label"].max() < 10
    assert len(dm.val_dataloader().dataset) == 179
