"""``adapt`` loses nothing: a short last batch, a failure mid-stream, an unwritable output folder, old
option names (real ``python -m mmalign adapt`` processes)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from _tta import image_folder, tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["-c", os.path.join(ROOT, "configs/tta/digits_c.yaml"), "-c", os.path.join(ROOT, "configs/tta/target.yaml")]


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


def _adapt(cwd, *args, code=None, timeout=300):
    """``python -m mmalign adapt ...``, or that call after ``code`` (a fault injected into the process)."""
    argv = ["adapt", *CONFIGS, *args, "--trainer.enable_progress_bar=false", "--data.init_args.stream.num_workers=0"]
    cmd = [sys.executable, "-m", "mmalign", *argv] if code is None else \
        [sys.executable, "-c", f"{code}\nfrom mmalign import cli\ncli.main({argv!r})"]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def source_and_folder(in_tmp):
    ckpt = str(in_tmp / "source.ckpt")
    tiny_checkpoint(ckpt)
    return ckpt, image_folder(in_tmp / "photos", classes=("a", "b", "c"), per_class=67)  # 201 images


def _csv_n(path):
    rows = list(csv.DictReader(open(path)))
    return {m: sum(int(r["n"]) for r in rows if r["method"] == m) for m in {r["method"] for r in rows}}


@pytest.mark.parametrize("policy", ["merge", "predict"])
def test_stream_of_201_at_batch_200_keeps_every_result(source_and_folder, in_tmp, policy):
    """Issue 24 item 6: the last batch holds one image. ``merge`` joins it to the batch before (one
    update on 201 images); ``predict`` predicts it without an update. Either way every image is scored
    and counted, and results.json / errors.csv are written."""
    ckpt, folder = source_and_folder
    out = in_tmp / f"out_{policy}"
    r = _adapt(in_tmp, f"--model.init_args.source.checkpoint={ckpt}", "--model.init_args.methods=[source,norm,tent]",
               f"--data.init_args.shards.test={folder}", "--data.init_args.stream.batch_size=200",
               f"--model.init_args.adapt.small_batch={policy}", "--model.init_args.norm.prior=0", f"--out_dir={out}",
               "--model.init_args.guard.source_fallback=false")  # a fallback batch takes no step (random source)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(out / "results.json"))
    assert res["complete"] is True and res["images_per_method"] == 201
    assert _csv_n(out / "errors.csv") == {"source": 201, "norm": 201, "tent": 201}
    assert res["updates"]["tent"] == 1
    if policy == "merge":
        assert res["short_batches"]["merged"] == 1 and res["short_batches"]["merged_samples"] == 1
        assert res["unadapted_small_batches"] == {"source": 0, "norm": 0, "tent": 0}
    else:
        assert res["short_batches"]["merged"] == 0
        assert res["unadapted_small_batches"] == {"source": 0, "norm": 1, "tent": 1}
        assert "predicted without an update: norm 1, tent 1" in r.stdout


@pytest.mark.parametrize("fault", ["RuntimeError('disk on fire')", "KeyboardInterrupt()"])
def test_a_failure_mid_stream_still_writes_what_was_measured(source_and_folder, in_tmp, fault):
    """The third TENT step raises: the process dies non-zero, and results.json / errors.csv hold the
    batches measured before, marked incomplete with the error."""
    ckpt, folder = source_and_folder
    code = ("import mmalign.tta.methods as M\n_step = M.Tent._step\ncalls = []\n"
            "def failing(self, x):\n    calls.append(1)\n"
            f"    if len(calls) == 3:\n        raise {fault}\n    return _step(self, x)\n"
            "M.Tent._step = failing")
    out = in_tmp / "out_fail"
    # the guard's fallback off: a batch it sends to the source statistics takes no TENT step, and the
    # random source model may have it do so on any batch
    r = _adapt(in_tmp, f"--model.init_args.source.checkpoint={ckpt}", "--model.init_args.methods=[source,tent]",
               f"--data.init_args.shards.test={folder}", "--data.init_args.stream.batch_size=50", f"--out_dir={out}",
               "--model.init_args.guard.source_fallback=false", code=code)
    assert r.returncode != 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["complete"] is False and res["error"].startswith(fault.split("(")[0])
    assert _csv_n(out / "errors.csv") == {"source": 100, "tent": 100}  # two whole batches; the third never finished
    assert "stopped early" in r.stdout


def test_an_unwritable_output_folder_stops_before_any_work(source_and_folder, in_tmp):
    ckpt, folder = source_and_folder
    (in_tmp / "taken").write_text("a file, not a folder")
    r = _adapt(in_tmp, f"--model.init_args.source.checkpoint={ckpt}", "--model.init_args.methods=[source,cafa]",
               f"--data.init_args.shards.test={folder}", "--data.init_args.shards.train=digits/train",
               f"--out_dir={in_tmp / 'taken' / 'sub'}")
    assert r.returncode != 0
    assert "adapt results location" in r.stderr and "--out_dir" in r.stderr
    assert not os.path.exists(in_tmp / "source.cafa_stats.pt")  # nothing was computed


def test_old_flat_options_name_their_new_place(source_and_folder, in_tmp):
    ckpt, folder = source_and_folder
    r = _adapt(in_tmp, f"--model.init_args.source_checkpoint={ckpt}", f"--data.init_args.shards.test={folder}")
    assert r.returncode != 0 and "moved to 'source.checkpoint'" in r.stderr, r.stderr[-1500:]
    old = in_tmp / "old.yaml"
    old.write_text("model:\n  init_args:\n    filter_alpha: 0.3\n")
    r = _adapt(in_tmp, "-c", str(old), f"--model.init_args.source.checkpoint={ckpt}",
               f"--data.init_args.shards.test={folder}")
    assert r.returncode != 0 and "moved to 'filter.alpha'" in r.stderr, r.stderr[-1500:]
