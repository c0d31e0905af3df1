import hashlib
import json
import os
import tarfile

import pytest

from datamodules.generate import generate_dataset


def _digest(path):
    with tarfile.open(path) as tf:  # member payloads only: tar headers carry write times
        return hashlib.sha1(b"".join(tf.extractfile(m).read() for m in tf if m.isreg())).hexdigest()


def _attrs(directory):
    out = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(directory, name)) as tf:
                out += [json.loads(tf.extractfile(m).read()) for m in tf if m.name.endswith(".json")]
    return out


def test_shapes_deterministic_and_heldout_disjoint(tmp_path):
    kw = dict(num_train=60, num_val=10, num_test=10, num_heldout=30, shard_size=30, image_size=32)
    a = generate_dataset("shapes", str(tmp_path / "a"), seed=3, **kw)
    generate_dataset("shapes", str(tmp_path / "b"), seed=3, **kw)
    generate_dataset("shapes", str(tmp_path / "c"), seed=4, **kw)
    shard = "train/shard-000000.tar"
    assert _digest(tmp_path / "a" / shard) == _digest(tmp_path / "b" / shard)
    assert _digest(tmp_path / "a" / shard) != _digest(tmp_path / "c" / shard)
    held = {(x["shape"], x["color"]) for x in _attrs(tmp_path / "a" / "heldout")}
    seen = {(x["shape"], x["color"]) for s in ("train", "val", "test") for x in _attrs(tmp_path / "a" / s)}
    assert held and not held & seen
    assert sorted(f"{c} {s}" for s, c in held) == sorted(a["heldout_combos"])
    # one held-out combination per shape and per colour: both still occur in training
    assert len({s for s, _ in held}) == len(held) == len({c for _, c in held})
    classes = json.loads((tmp_path / "a" / "classes.json").read_text())
    x = _attrs(tmp_path / "a" / "heldout")[0]
    assert classes["classnames"][x["combo_id"]] == f"{x['color']} {x['shape']}"


def test_digits_split_is_stratified_and_deterministic(tmp_path):
    info = generate_dataset("digits", str(tmp_path / "d"), image_size=16)
    assert info["splits"] == {"train": 1259, "val": 179, "test": 359}
    again = generate_dataset("digits", str(tmp_path / "e"), image_size=16)
    assert _digest(tmp_path / "d/test/shard-000000.tar") == _digest(tmp_path / "e/test/shard-000000.tar")
    labels = [x["label"] for x in _attrs(tmp_path / "d" / "test")]
    assert sorted(set(labels)) == list(range(10)) and again["splits"] == info["splits"]


def test_interrupted_generation_is_not_mistaken_for_data(tmp_path):
    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "junk").write_text("x")
    with pytest.raises(FileExistsError, match="interrupted"):
        generate_dataset("shapes", str(tmp_path / "shapes"))


def test_an_earlier_dataset_with_other_settings_is_named_and_a_missing_split_refused(tmp_path, caplog):
    """A generated folder is reused as it is; settings it was not made with are reported, and a split
    the config reads but the folder lacks (generated before that split existed) stops with advice."""
    from datamodules import ImageTextDataModule, ShardError

    root = str(tmp_path / "shapes")
    small = dict(num_train=20, num_val=4, num_test=4, num_heldout=4, shard_size=10)
    generate_dataset("shapes", root, **small)
    caplog.clear()
    with caplog.at_level("WARNING", logger="datamodules.generate"):
        generate_dataset("shapes", root, **{**small, "num_train": 40})
    assert "num_train=20 (asked: 40)" in caplog.text and "Delete the folder" in caplog.text
    os.rename(os.path.join(root, "heldout"), str(tmp_path / "moved"))  # as if made by an older generator
    dm = ImageTextDataModule(shards={"data_root": str(tmp_path), "train": "shapes/train", "val": "shapes/val",
                                     "extra_val": {"heldout": "shapes/heldout"}},
                             stream={"num_workers": 0}, generate={"name": "shapes", "kwargs": small})
    with pytest.raises(ShardError, match=r"without the split\(s\) \['heldout'\].*Delete"):
        dm.prepare_data()


@pytest.mark.parametrize("args, message", [
    (["digits", "--num-train", "5"], "'num_train' is not an option of the 'digits' generator"),
    (["shapes", "--shard-size", "0"], "generate.kwargs.shard_size must be > 0, got 0"),
])
def test_generate_script_refuses_options_in_one_line_before_work(tmp_path, args, message):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "generate_data.py"), *args, "--root",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    assert res.returncode == 2 and message in res.stderr.strip().splitlines()[-1], res.stderr[-1000:]
    assert not (tmp_path / "out").exists()
