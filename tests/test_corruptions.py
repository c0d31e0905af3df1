"""CIFAR-10-C corruptions and the shard writer: shapes, determinism, severity ordering, errors."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from datamodules.corruptions import CORRUPTIONS, STOCHASTIC, corrupt

EXPECTED_ORDER = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform",
    "pixelate", "jpeg_compression",
)


def structured_image(size: int, seed: int = 0) -> np.ndarray:
    """Colour gradients + random rectangles + a disc + vertical stripes: edges, flat areas and
    fine texture, so blurs, pixelation and noise all have something to change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, 1 - x * y], -1) * 150 + 40
    for _ in range(4):
        top, left = rng.integers(0, size - size // 4, 2)
        side = rng.integers(size // 8, size // 3)
        img[top : top + side, left : left + side] = rng.integers(0, 256, 3)
    disc = (x - rng.uniform(0.3, 0.7)) ** 2 + (y - rng.uniform(0.3, 0.7)) ** 2 < 0.02
    img[disc] = rng.integers(0, 256, 3)
    img += 20 * np.sin(2 * np.pi * x * size / 6)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> dict[int, np.ndarray]:
    return {32: structured_image(32, 0), 48: structured_image(48, 1)}


def test_order_is_the_benchmark_order():
    assert CORRUPTIONS == EXPECTED_ORDER
    assert set(STOCHASTIC) <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_severity_keeps_shape_and_changes_image(name, images):
    for size, img in images.items():
        before = img.copy()
        for severity in range(1, 6):
            out = corrupt(img, name, severity, seed=0)
            assert out.shape == (size, size, 3) and out.dtype == np.uint8
            assert not np.array_equal(out, img), f"{name} s{severity} at {size}px left image unchanged"
        assert np.array_equal(img, before), "input array was modified"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_and_seed_dependence(name, images):
    img = images[32]
    a = corrupt(img, name, 3, seed=7)
    np.random.seed(123)  # global state must not matter
    b = corrupt(img, name, 3, seed=7)
    assert a.tobytes() == b.tobytes()
    c = corrupt(img, name, 3, seed=8)
    if name in STOCHASTIC:
        assert not np.array_equal(a, c), f"{name} ignores the seed"
    else:
        assert np.array_equal(a, c), f"{name} should not depend on the seed"


def _mean_abs_diff(out: np.ndarray, img: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - img).mean())


def _one_minus_corr(out: np.ndarray, img: np.ndarray) -> float:
    return 1.0 - float(np.corrcoef(out.ravel().astype(np.float64), img.ravel())[0, 1])


def _non_affine_displacement(name: str, severity: int, seed: int, size: int = 48) -> float:
    """RMS of the displacement left after fitting an affine map, measured by corrupting an image
    whose red/green channels encode each pixel's column/row (interior only, away from reflections)."""
    k, m = 5, 10
    rows, cols = np.mgrid[0:size, 0:size]
    coords = np.stack([cols * k, rows * k, np.full_like(rows, 128)], -1).astype(np.uint8)
    out = corrupt(coords, name, severity, seed).astype(np.float64)[m:-m, m:-m]
    design = np.stack([rows[m:-m, m:-m].ravel(), cols[m:-m, m:-m].ravel(), np.ones(out[..., 0].size)], 1)
    target = np.stack([out[..., 1].ravel() / k, out[..., 0].ravel() / k], 1)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(np.sqrt(((design @ coef - target) ** 2).sum(1).mean()))


# Severity ordering is checked as "severity 5 changes the image more than severity 1", averaged
# over images and seeds, with a measure that matches what the corruption does:
# - frost: the image weight falls (1 -> 0.75) while the frost weight rises (0.2 -> 0.45), so the
#   mean absolute difference is not monotone by construction; the loss of correlation with the
#   clean image is.
# - elastic_transform: the random affine jitter *shrinks* with severity (8% -> 3% of the side)
#   while the local elastic field grows, so pixel differences fall with severity; the non-affine
#   part of the displacement is what grows (tested separately below).
@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "elastic_transform"])
def test_severity_five_is_stronger_than_one(name):
    metric = _one_minus_corr if name == "frost" else _mean_abs_diff
    effect = {1: [], 5: []}
    for size in (32, 48):
        for seed in range(3):
            img = structured_image(size, seed)
            for severity in effect:
                effect[severity].append(metric(corrupt(img, name, severity, seed=seed), img))
    assert np.mean(effect[5]) > np.mean(effect[1]), (name, effect)


def test_elastic_non_affine_displacement_grows():
    sev1 = np.mean([_non_affine_displacement("elastic_transform", 1, s) for s in range(2)])
    sev5 = np.mean([_non_affine_displacement("elastic_transform", 5, s) for s in range(2)])
    assert sev1 < 0.15  # severity 1 is a pure affine map (residual = interpolation rounding)
    assert sev5 > 3 * sev1, (sev1, sev5)


def test_grayscale_and_rectangular_inputs():
    gray = structured_image(32)[..., 0]
    out = corrupt(gray, "contrast", 2)
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out, corrupt(np.repeat(gray[..., None], 3, 2), "contrast", 2))
    assert np.array_equal(out, corrupt(gray[..., None], "contrast", 2))
    rect = np.ascontiguousarray(structured_image(48)[:32])
    for name in CORRUPTIONS:
        assert corrupt(rect, name, 5).shape == (32, 48, 3)


def test_bad_arguments():
    img = structured_image(32)
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(img, "gaussian_blur", 1)
    for bad in (0, 6, -1, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(img, "fog", bad)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(img.astype(np.float32), "fog", 1)
    with pytest.raises(ValueError, match="shape"):
        corrupt(np.zeros((32, 32, 4), np.uint8), "fog", 1)


# ---- shards -----------------------------------------------------------------------------------


def _write_shards(tmp_path, n_shards=2, per_shard=3):
    import webdataset as wds

    src = tmp_path / "src"
    src.mkdir()
    paths, index = [], 0
    for shard in range(n_shards):
        path = src / f"shard-{shard:03d}.tar"
        with wds.TarWriter(str(path), encoder=False) as sink:
            for _ in range(per_shard):
                img = structured_image(32, index)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG" if index % 2 else "PNG")
                ext = "jpg" if index % 2 else "png"
                sink.write({
                    "__key__": f"s{index:04d}",
                    ext: buf.getvalue(),
                    "cls": str(index % 10).encode(),
                    "json": json.dumps({"index": index}).encode(),
                })
                index += 1
        paths.append(str(path))
    return paths


def _read(path):
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_corrupt_shards(tmp_path, capsys):
    from datamodules.corrupt import corrupt_shards

    paths = _write_shards(tmp_path)
    out = tmp_path / "out"
    names = ("gaussian_noise", "jpeg_compression")
    manifest = corrupt_shards(paths, str(out), corruptions=names, severities=(1, 5), seed=3)
    assert "corrupt_shards" in capsys.readouterr().out  # progress printed

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert on_disk["samples_per_domain"] == {f"{n}/{s}": 6 for n in names for s in (1, 5)}

    clean = {}
    for path in paths:
        clean.update(_read(path))
    for name in names:
        for severity in (1, 5):
            folder = out / name / str(severity)
            assert sorted(p.name for p in folder.iterdir()) == ["shard-000.tar", "shard-001.tar", "sizes.json"]
            assert json.loads((folder / "sizes.json").read_text()) == {"shard-000.tar": 3, "shard-001.tar": 3}
            got = {}
            for shard in sorted(folder.glob("*.tar")):
                got.update(_read(shard))
            assert sorted(got) == sorted(clean)
            for key, sample in got.items():
                assert set(sample) == {"png", "cls", "json"}
                assert sample["cls"] == clean[key]["cls"] and sample["json"] == clean[key]["json"]
                src_ext = "png" if "png" in clean[key] else "jpg"
                before = np.asarray(Image.open(io.BytesIO(clean[key][src_ext])).convert("RGB"))
                after = np.asarray(Image.open(io.BytesIO(sample["png"])))
                assert after.shape == before.shape and not np.array_equal(after, before)

    # Per-sample seeds depend only on (seed, corruption, severity, position): one shard alone,
    # written again, is byte-identical.
    again = tmp_path / "again"
    corrupt_shards([paths[0], paths[1]], str(again), corruptions=("gaussian_noise",),
                   severities=(5,), seed=3, verbose=False)
    for shard in ("shard-000.tar", "shard-001.tar"):
        first = (out / "gaussian_noise/5" / shard).read_bytes()
        assert (again / "gaussian_noise/5" / shard).read_bytes() == first


def test_corrupt_shards_errors(tmp_path):
    from datamodules.corrupt import corrupt_shards

    paths = _write_shards(tmp_path, n_shards=1, per_shard=1)
    with pytest.raises(ValueError, match="valid names"):
        corrupt_shards(paths, str(tmp_path / "o"), corruptions=("nope",))
    with pytest.raises(ValueError, match="severity"):
        corrupt_shards(paths, str(tmp_path / "o"), severities=(7,))
    with pytest.raises(FileNotFoundError):
        corrupt_shards([str(tmp_path / "missing.tar")], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="webp"):
        corrupt_shards(paths, str(tmp_path / "o"), corruptions=("fog",), image_key="webp", verbose=False)
    assert not list((tmp_path / "o" / "fog" / "5").glob("*.tmp"))  # no partial shard left behind
