"""scripts/to_shards.py: image folders and CSVs become shards the datamodules read."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("to_shards", os.path.join(ROOT, "scripts", "to_shards.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _img(path, value, fmt="PNG"):
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path, format=fmt)


def test_image_folder_to_labelled_shards(tmp_path):
    for c, n in (("big_cat", 3), ("dog", 2)):
        (tmp_path / "in" / c).mkdir(parents=True)
        for i in range(n):
            _img(tmp_path / "in" / c / f"{i}.png", 40 * i)
    (tmp_path / "in" / "dog" / "broken.jpg").write_bytes(b"not an image")
    info = _script().main(["--imagefolder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--shard-size", "2"])
    assert info == {"samples": 5, "shards": 3, "skipped": 1, "examples": info["examples"], "classes": 2,
                    "renamed_keys": 0}
    assert json.load(open(tmp_path / "out" / "classes.json"))["classnames"] == ["big cat", "dog"]
    from datamodules import ImageLabelDataModule, ImageTextDataModule

    dm = ImageLabelDataModule(shards={"test": str(tmp_path / "out")}, stream={"num_workers": 0, "batch_size": 8},
                              label={"num_classes": 2}, image={"size": 8})
    dm.setup("test")
    [batch] = list(dm.test_dataloader())
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1]
    dm = ImageTextDataModule(shards={"test": str(tmp_path / "out")}, stream={"num_workers": 0, "batch_size": 8},
                             image={"size": 8})
    dm.setup("test")
    assert set(next(iter(dm.test_dataloader()))["text"]) == {"a photo of a big cat.", "a photo of a dog."}


def test_csv_to_caption_shards(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = ["path,caption,label"]
    for i in range(4):
        _img(tmp_path / "imgs" / f"{i}.bmp", 50 * i, "BMP")  # re-encoded as JPEG
        rows.append(f"imgs/{i}.bmp,caption number {i},{i % 2}")
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    info = _script().main(["--csv", str(tmp_path / "caps.csv"), "--out", str(tmp_path / "out")])
    assert info["samples"] == 4 and info["skipped"] == 0
    from datamodules import ImageTextDataModule

    dm = ImageTextDataModule(shards={"train": str(tmp_path / "out")}, stream={"num_workers": 0, "batch_size": 2},
                             image={"size": 8})
    dm.setup("fit")
    texts = [t for b in dm.train_dataloader() for t in b["text"]]
    assert sorted(texts) == [f"caption number {i}" for i in range(4)]


def test_bad_csv_column_is_named(tmp_path):
    (tmp_path / "x.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(SystemExit, match="no image column .*columns: \\['foo', 'bar'\\]"):
        _script().main(["--csv", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o")])
