"""The published TTA benchmark files as streams (datamodules/benchmarks.py, CorruptionStream's benchmark.layout):
CIFAR-10-C/100-C ``.npy`` folders and ImageNet-C folder trees, built tiny here, read without conversion."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import DataConfigError, Preprocess, ShardError
from mmalign.tta.domains import CorruptionStream

N = 7  # images per severity block (10000 in the published files): the reader takes it from the file length


def _cifar_c(directory, corruptions=("gaussian_noise", "speckle_noise"), n=N, tiled=True, classes=10, seed=0):
    """``<corruption>.npy`` uint8 (5 n, 32, 32, 3) + ``labels.npy`` (5 n labels, or the n of one block)."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    data = {c: rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8) for c in corruptions}
    for c, arr in data.items():
        np.save(os.path.join(directory, f"{c}.npy"), arr)
    block = rng.integers(0, classes, n)
    labels = np.tile(block, 5) if tiled else block
    np.save(os.path.join(directory, "labels.npy"), labels.astype(np.int64))
    return data, block


def _stream(directory, layout, corruptions, severities, **label):
    from torchvision.transforms import PILToTensor

    names = corruptions if isinstance(corruptions, str) else list(corruptions)
    stream = CorruptionStream(benchmark={"dir": str(directory), "layout": layout, "corruptions": names,
                                         "severities": list(severities)},
                              stream={"num_workers": 0, "batch_size": 64}, adapt={"shuffle": False},
                              label={"num_classes": 10, **label}, preprocess=Preprocess(eval_transform=PILToTensor()))
    stream.prepare_data()
    stream.setup("test")
    return stream


@pytest.mark.parametrize("tiled", [True, False], ids=["labels-5N", "labels-N"])
def test_a_cifar_c_folder_streams_each_severity_block_with_its_labels(tmp_path, tiled):
    data, labels = _cifar_c(tmp_path, tiled=tiled)
    stream = _stream(tmp_path, "cifar_c", ["speckle_noise", "gaussian_noise"], [5, 1])
    assert stream.domain_names == ["speckle_noise/5", "speckle_noise/1", "gaussian_noise/5", "gaussian_noise/1"]
    for domain in stream.domain_names:
        corruption, severity = domain.split("/")
        [batch] = list(stream.domain_batches(domain))
        block = data[corruption][(int(severity) - 1) * N: int(severity) * N]  # rows of this severity
        assert torch.equal(batch["image"], torch.from_numpy(block).permute(0, 3, 1, 2)), domain
        assert batch["label"].tolist() == labels.tolist()


def test_all_means_the_15_benchmark_corruptions_in_the_standard_order(tmp_path):
    from datamodules.corruptions import CORRUPTIONS

    extra = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # in CIFAR-10-C, not in the 15
    _cifar_c(tmp_path, CORRUPTIONS + extra, n=2)
    stream = _stream(tmp_path, "cifar_c", "all", [3])
    assert [d.split("/")[0] for d in stream.domain_names] == list(CORRUPTIONS) and len(CORRUPTIONS) == 15
    assert stream.domain_names[0] == "gaussian_noise/3" and stream.domain_names[-1] == "jpeg_compression/3"


@pytest.mark.parametrize("edit, message", [
    (lambda d: os.remove(d / "speckle_noise.npy"), r"has no speckle_noise.npy \(it holds: \['gaussian_noise'\]\)"),
    (lambda d: np.save(d / "labels.npy", np.zeros(3, np.int64)), r"labels.npy' holds 3 labels; .* needs 35 \(or 7\)"),
    (lambda d: np.save(d / "speckle_noise.npy", np.zeros((34, 32, 32, 3), np.uint8)), r"holds 34 images, not 5 blocks"),
    (lambda d: np.save(d / "speckle_noise.npy", np.zeros((35, 32, 32, 3), np.float32)), r"holds float32 .*uint8"),
])
def test_a_broken_cifar_c_folder_is_named_in_one_line(tmp_path, edit, message):
    _cifar_c(tmp_path)
    edit(tmp_path)
    with pytest.raises(ShardError, match=message):
        _stream(tmp_path, "cifar_c", ["gaussian_noise", "speckle_noise"], [1])


def _imagenet_c(root, domains, wnids, per_class=2):
    for domain in domains:
        for k, wnid in enumerate(wnids):
            folder = root / domain / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (40 * k, 10 * i, 0)).save(folder / f"ILSVRC_{k}_{i}.JPEG", quality=95)


def test_an_imagenet_c_tree_streams_its_domains_with_wnid_classes(tmp_path):
    wnids = ["n01440764", "n01443537", "n02102040"]
    _imagenet_c(tmp_path, ["fog/5", "fog/1", "gaussian_noise/5"], wnids)
    stream = _stream(tmp_path, "imagenet_c", ["fog", "gaussian_noise"], [5])
    assert stream.domain_names == ["fog/5", "gaussian_noise/5"]
    [batch] = list(stream.domain_batches("fog/5"))
    assert sorted(zip(batch["key"], batch["label"].tolist())) == sorted(
        (f"{w}/ILSVRC_{k}_{i}", k) for k, w in enumerate(wnids) for i in range(2))
    # an index file in another order names the classes: labels follow the names, not the folder order
    (tmp_path / "synsets.txt").write_text("n02102040 English springer\nn01440764 tench\nn01443537 goldfish\n")
    stream = _stream(tmp_path, "imagenet_c", ["fog"], [1], classes=str(tmp_path / "synsets.txt"))
    [batch] = list(stream.domain_batches("fog/1"))
    assert {k.split("/")[0]: v for k, v in zip(batch["key"], batch["label"].tolist())} == \
        {"n02102040": 0, "n01440764": 1, "n01443537": 2}


def test_imagenet_c_domains_with_different_wnids_are_refused_unless_an_index_file_names_them(tmp_path):
    _imagenet_c(tmp_path, ["fog/5"], ["n01", "n02", "n03"])
    _imagenet_c(tmp_path, ["snow/5"], ["n01", "n03"])
    with pytest.raises(DataConfigError, match=r"class folders of domain fog/5 .* and domain snow/5 .* differ"):
        _stream(tmp_path, "imagenet_c", ["fog", "snow"], [5])
    (tmp_path / "wnids.json").write_text('["n01", "n02", "n03"]')
    stream = _stream(tmp_path, "imagenet_c", ["fog", "snow"], [5], classes=str(tmp_path / "wnids.json"))
    [batch] = list(stream.domain_batches("snow/5"))
    assert sorted(batch["label"].tolist()) == [0, 0, 2, 2]  # n03 stays class 2 without its neighbour n02
    with pytest.raises(FileNotFoundError, match=r"domains \['frost/5'\] are missing .*layout imagenet_c"):
        _stream(tmp_path, "imagenet_c", ["frost"], [5])


@pytest.mark.parametrize("layout", ["cifar_c", "imagenet_c"])
def test_adapt_runs_on_the_published_layouts_without_conversion(in_tmp, layout):
    """``python -m mmalign adapt`` (in process, as the config tests run it) with a tiny random source model
    on each layout: every domain of the standard order is adapted on, every image of it counted."""
    from mmalign import cli
    from tests.test_configs import ADAPT_QUICK

    bench = in_tmp / "bench"
    if layout == "cifar_c":
        _cifar_c(bench, ["gaussian_noise", "fog", "speckle_noise"])
        expected = N
    else:
        _imagenet_c(bench, ["gaussian_noise/1", "gaussian_noise/5", "fog/1", "fog/5"], ["n01", "n02"], per_class=3)
        expected = 6
    cli.main(["adapt", "-c", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs/tta/digits_c.yaml"),
              *ADAPT_QUICK, "--model.init_args.num_classes=10", f"--data.init_args.benchmark.layout={layout}",
              f"--data.init_args.benchmark.dir={bench}", "--data.init_args.benchmark.corruptions=[gaussian_noise,fog]",
              "--data.init_args.benchmark.severities=[1,5]", "--max_batches=null", "--rounds=1",
              "--trainer.enable_progress_bar=false"])
    rows = list(csv.DictReader(open(in_tmp / "adapt_out" / "errors.csv")))
    source = [(r["domain"], int(r["n"])) for r in rows if r["method"] == "source"]
    # the domains in the order given, each severity block in turn
    assert source == [("gaussian_noise/1", expected), ("gaussian_noise/5", expected), ("fog/1", expected),
                      ("fog/5", expected)]
    assert all(r["error_pct"] != "" for r in rows)
