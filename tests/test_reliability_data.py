"""Data-side faults of issue 24: resume after a change to the stream, a changed shard set, the shard
converter, ``pipe:`` specs, malformed side files and CSV rows, read-only data roots, small eval sets in
DDP, stray generation folders, and the inputs real users bring (image modes, label spellings, folder
layouts, captions). Each case: decoded correctly, skipped and counted, or refused with one line."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs/classify/digits.yaml")


# ---- 1. resume after a change to the stream -----------------------------------------------------

def _fit(cwd, data, record, *extra, devices=None, timeout=600):
    """``mmalign fit`` of the digits config in ``cwd`` (digits under ``data``), recording every batch."""
    args = [sys.executable, "-m", "mmalign", "fit", "-c", DIGITS, "--model.class_path=tests._modules.RecordingClassifier",
            f"--model.init_args.record={record}", "--checkpoint.every_n_train_steps=4",
            "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.check_val_every_n_epoch=100",
            "--data.init_args.stream.num_workers=0", *extra]
    if devices:
        args += ["--trainer.strategy=ddp", f"--trainer.devices={devices}", "--trainer.accelerator=cpu"]
    env = {**os.environ, "MMALIGN_DATA": str(data), "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _records(path):
    rows = {}
    for line in open(path):
        row = json.loads(line)
        rows.setdefault(row["step"], []).append(row)  # DDP: one row per rank and step
    return rows


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, data_root):
    """A digits fit (batch 64, 19 batches per epoch) stopped at step 8, checkpoints at steps 4 and 8,
    with its own copy of the data (copied with its modification times, as ``cp -p`` would)."""
    base = tmp_path_factory.mktemp("stopped")
    shutil.copytree(os.path.join(data_root, "digits"), base / "data" / "digits")
    res = _fit(base, base / "data", base / "batches.jsonl", "--trainer.max_steps=8")
    assert res.returncode == 0, res.stderr[-3000:]
    return base


def _resume(stopped_run, tmp_path, *change, max_steps, devices=None, edit=None):
    """Copy the stopped run, apply ``edit`` to the copy of its data, resume it with ``change``."""
    shutil.copytree(stopped_run, tmp_path / "run")
    cwd = tmp_path / "run"
    if edit is not None:
        edit(cwd / "data" / "digits" / "train")
    res = _fit(cwd, cwd / "data", cwd / "batches.jsonl", "--ckpt_path=last", f"--trainer.max_steps={max_steps}",
               *change, devices=devices)
    assert res.returncode == 0, res.stderr[-3000:]
    [ckdir] = glob.glob(str(cwd / "runs/mmalign/version_*/checkpoints"))
    steps = sorted(torch.load(os.path.join(ckdir, f), weights_only=True)["global_step"] for f in os.listdir(ckdir))
    return res.stderr, _records(cwd / "batches.jsonl"), steps


def _epoch_of(records):
    return {s: {r["epoch"] for r in rows} for s, rows in records.items()}


def test_resume_with_a_smaller_batch_continues_every_reader_where_it_was(stopped_run, tmp_path):
    """Batch 64 -> 32, same shards and readers: 512 samples of epoch 0 were trained on, so the epoch
    continues at batch 16 of 39 (1259 // 32), each reader at its own position: no sample of the epoch
    repeats, the epoch ends after 23 more batches, and the run checkpoints again."""
    err, records, steps = _resume(stopped_run, tmp_path, "--data.init_args.stream.batch_size=32", max_steps=33)
    assert "stream_position" not in err and "continues from sample 512 of 1259 (batch 16 of 39 per rank), every " \
                                              "reader at its own position" in err, err[-2000:]
    epochs = _epoch_of(records)
    assert [s for s in range(33) if epochs[s] == {0}] == list(range(31)) and epochs[31] == epochs[32] == {1}
    epoch0 = [k for s in range(31) for k in records[s][-1]["keys"]]
    assert len(epoch0) == 8 * 64 + 23 * 32 == len(set(epoch0))  # 1248 of the 1259 samples, none twice
    assert {24, 28, 32, 33} <= set(steps)  # the 3 newest step checkpoints and last.ckpt


def test_resume_with_more_workers_continues_from_the_global_position(stopped_run, tmp_path):
    """num_workers 0 -> 2: other readers, same epoch: it continues at batch 8 of 19 and ends there."""
    err, records, steps = _resume(stopped_run, tmp_path, "--data.init_args.stream.num_workers=2", max_steps=21)
    assert "readers per rank 1 -> 2" in err and "continues from sample 512 of 1259 (batch 8 of 19" in err, err[-2000:]
    epochs = _epoch_of(records)
    assert all(epochs[s] == {0} for s in range(19)) and epochs[19] == epochs[20] == {1}
    assert {12, 16, 20, 21} <= set(steps)


def test_resume_after_a_shard_was_removed_restarts_the_epoch(stopped_run, tmp_path):
    """One shard of 200 removed: the epoch's content changed, so epoch 0 restarts from its first batch
    (16 batches of the 1059 left), saying so, and the run checkpoints again."""
    err, records, steps = _resume(stopped_run, tmp_path, max_steps=26,
                                  edit=lambda d: os.remove(os.path.join(d, "shard-000002.tar")))
    assert "1 shard(s) removed: shard-000002.tar" in err and "Epoch 0 restarts from its first batch" in err, \
        err[-2000:]
    epochs = _epoch_of(records)
    assert all(epochs[s] == {0} for s in range(8, 24)) and epochs[24] == {1}
    assert {16, 20, 24, 26} <= set(steps)


@pytest.mark.distributed
def test_resume_on_two_processes_continues_from_the_global_position(stopped_run, tmp_path):
    """1 -> 2 DDP processes (gloo): 512 samples done = 4 global batches of 2 x 64; 9 per epoch."""
    err, records, steps = _resume(stopped_run, tmp_path, max_steps=14, devices=2)
    assert "ranks 1 -> 2" in err and "continues from sample 512 of 1259 (batch 4 of 9 per rank)" in err, err[-2000:]
    epochs = _epoch_of(records)
    assert all(len(records[s]) == 2 and epochs[s] == {0} for s in range(8, 13)), records
    assert epochs[13] == {1} and {12, 14} <= set(steps)
    keys = [set(r["keys"]) for r in records[9]]
    assert not keys[0] & keys[1]  # the two ranks read disjoint samples


# ---- 2. a changed shard set is noticed ------------------------------------------------------------

def _loader(directory, epoch=0):
    from datamodules import ImageTextDataModule
    from datamodules.stream import StreamingLoader

    dm = ImageTextDataModule(shards={"train": str(directory)}, stream={"batch_size": 4, "num_workers": 0,
                                                                       "shuffle_buffer": 4}, image={"size": 8})
    dm.setup("fit")
    return StreamingLoader(dm._train, epoch_fn=lambda: epoch)


def _stop_after(directory, n):
    loader = _loader(directory)
    it = iter(loader)
    for _ in range(n):
        next(it)
    return loader.state_dict()


def _swap(a, b):
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)


@pytest.mark.parametrize("change, notice", [
    (None, None),  # the same shards, moved as a whole with their times: exact
    (lambda d: os.rename(d / "s-0001.tar", d / "s-0009.tar"),
     "1 shard(s) removed: s-0001.tar; 1 shard(s) added: s-0009.tar"),
    (lambda d: _swap(str(d / "s-0000.tar"), str(d / "s-0002.tar")), "2 shard(s) rewritten: s-0000.tar, s-0002.tar"),
])
def test_a_changed_shard_set_is_noticed_and_restarts_the_epoch(tmp_path, capsys, change, notice):
    from tests._data import write_shards

    write_shards(str(tmp_path / "a"), [8, 8, 8, 8])
    state = _stop_after(tmp_path / "a", 3)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copy2: times kept, as cp -p / rsync -a do
    if change is not None:
        change(tmp_path / "b")
    capsys.readouterr()
    resumed = _loader(tmp_path / "b")
    resumed.load_state_dict(state)
    rest = [b["key"] for b in resumed]
    whole = [b["key"] for b in _loader(tmp_path / "b")]
    err = capsys.readouterr().err
    if notice is None:
        assert rest == whole[3:] and "[resume]" not in err
    else:
        assert rest == whole, "the epoch did not restart: samples of the interrupted part repeat without a word"
        assert notice in err and "Epoch 0 restarts from its first batch" in err and len(err.strip().splitlines()) == 1


# ---- 7. the shard converter -----------------------------------------------------------------------

def _to_shards():
    import importlib.util

    spec = importlib.util.spec_from_file_location("to_shards", os.path.join(ROOT, "scripts", "to_shards.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _save(path, value, fmt="PNG", mode="RGB", size=12):
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).convert(mode).save(path, format=fmt)


def _tar_contents(out):
    """What a reader sees in the written tars: per shard, the samples and their source paths."""
    from datamodules.shards import expand_shards, iter_tar_samples

    shards = {}
    for url in expand_shards(str(out)):
        samples = list(iter_tar_samples(url, []))
        shards[os.path.basename(url)] = [json.loads(s["json"])["path"] for s in samples]
    return shards


def test_converter_never_merges_two_files_into_one_key(tmp_path):
    """img0.png + img0.jpg share the key img0; a.b.png + a_b.png share a_b (dots become _): each file
    stays its own sample, and sizes.json and the printed count are what the tars hold."""
    src = tmp_path / "in" / "cats"
    for name, fmt in (("img0.png", "PNG"), ("img0.jpg", "JPEG"), ("a.b.png", "PNG"), ("a_b.png", "PNG"),
                      ("a_b_png.png", "PNG")):
        _save(str(src / name), 60, fmt)
    info = _to_shards()(["--imagefolder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--shard-size", "3"])
    shards = _tar_contents(tmp_path / "out")
    paths = sorted(os.path.basename(p) for ps in shards.values() for p in ps)
    assert paths == sorted(["img0.png", "img0.jpg", "a.b.png", "a_b.png", "a_b_png.png"])
    assert json.load(open(tmp_path / "out" / "sizes.json")) == {k: len(v) for k, v in shards.items()}
    assert info["samples"] == 5 and info["renamed_keys"] == 3  # a_b_png, a_b_png_png, img0_png


def test_a_writer_refuses_a_key_it_would_merge(tmp_path):
    from datamodules.shards import write_shards

    with pytest.raises(ValueError, match="two samples share the key 'k' in shard s-000000.tar"):
        write_shards(str(tmp_path), ({"__key__": "k", "txt": str(i)} for i in range(2)), 5, "s")
    with pytest.raises(ValueError, match=r"sample key 'a.b' cannot be written.*no '\.' in its last part"):
        write_shards(str(tmp_path / "x"), [{"__key__": "a.b", "txt": "t"}], 5, "s")


@pytest.mark.parametrize("rows, message", [
    (["path,caption,label", "i0.png,a cat,abc"], r"row 2: label 'abc' is not a class index"),
    (["path,caption,label", "i0.png,a cat,-1"], r"row 2: label '-1' is not a class index"),
    (["path,caption,label", "i0.png,a cat,2.5"], r"row 2: label '2.5' is not a class index"),
    (["path,caption,label", "i0.png,a cat,1", "i0.png,a, cat,1"], r"row 3 has more fields than the header"),
])
def test_converter_names_a_malformed_csv_row(tmp_path, rows, message):
    _save(str(tmp_path / "i0.png"), 10)
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit, match=message):
        _to_shards()(["--csv", str(tmp_path / "c.csv"), "--out", str(tmp_path / "out")])


def test_converter_reads_label_spellings_and_skips_unreadable_rows_by_number(tmp_path):
    for i in range(3):
        _save(str(tmp_path / f"i{i}.png"), 40 * i)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = ["path,caption,label", "i0.png,zero,3", "i1.png,one, 3 ", "i2.png,two,3.0", "missing.png,gone,1",
            "bad.png,broken,1", ",no path,1"]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    info = _to_shards()(["--csv", str(tmp_path / "c.csv"), "--out", str(tmp_path / "out")])
    assert info["samples"] == 3 and info["skipped"] == 3
    assert [e.split(":")[0] for e in info["examples"]] == ["row 5", "row 6", "row 7"]
    from datamodules.shards import expand_shards, iter_tar_samples

    labels = [s["cls"] for u in expand_shards(str(tmp_path / "out")) for s in iter_tar_samples(u, [])]
    assert labels == [b"3", b"3", b"3"]


def test_converter_names_a_csv_that_is_not_utf8(tmp_path):
    (tmp_path / "c.csv").write_bytes("path,caption\ni0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="is not UTF-8 text .* save it as UTF-8"):
        _to_shards()(["--csv", str(tmp_path / "c.csv"), "--out", str(tmp_path / "out")])


# ---- 10. pipe: shard specs ------------------------------------------------------------------------

def test_a_failing_pipe_command_is_named_with_its_exit_status(tmp_path):
    from datamodules import ImageTextDataModule
    from datamodules.shards import PipeCommandError

    for workers in (0, 2):
        dm = ImageTextDataModule(shards={"train": [f"pipe:cat {tmp_path}/missing-{i}.tar" for i in range(2)],
                                         "validate": False, "samples_per_epoch": 4},
                                 stream={"num_workers": workers, "batch_size": 2})
        dm.setup("fit")
        with pytest.raises(PipeCommandError, match=r"the shell command 'cat .*/missing-\d.tar' exited with status 1"):
            list(dm.train_dataloader())


def test_a_pipe_spec_recorded_in_a_checkpoint_is_never_run(tmp_path):
    from datamodules import ImageTextDataModule, ShardError
    from tests._data import write_shards

    [shard] = write_shards(str(tmp_path / "d"), [4])
    ran = tmp_path / "RAN"
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"datamodule_hyper_parameters": {"shards": {"train": f"pipe:touch {ran}; cat {shard}"},
                                                "stream": {"num_workers": 0, "batch_size": 2}}}, ckpt)
    with pytest.raises(ShardError, match=r"records the shell command\(s\) shards.train='pipe:touch .*a checkpoint "
                                         r"never runs a command"):
        ImageTextDataModule.load_from_checkpoint(str(ckpt))
    assert not ran.exists()
    dm = ImageTextDataModule.load_from_checkpoint(str(ckpt), shards={"train": f"pipe:cat {shard}", "validate": False,
                                                                     "samples_per_epoch": 4})
    dm.setup("fit")  # given by the caller: runs
    assert len([k for b in dm.train_dataloader() for k in b["key"]]) == 4 and not ran.exists()


def test_a_fit_checkpoint_records_the_data_specs_and_they_load_back(stopped_run):
    from datamodules import ImageLabelDataModule

    [ckpt] = glob.glob(str(stopped_run / "runs/mmalign/version_0/checkpoints/last.ckpt"))
    hp = torch.load(ckpt, weights_only=True)["datamodule_hyper_parameters"]
    assert hp["shards"]["train"] == "digits/train" and hp["stream"]["batch_size"] == 64 and "preprocess" not in hp
    dm = ImageLabelDataModule.load_from_checkpoint(ckpt)
    assert dm.cfg.label.num_classes == 10 and dm.cfg.image.size == 32 and dm.cfg.stream.num_workers == 0


def test_a_stream_whose_shards_all_yield_nothing_fails_instead_of_hanging(tmp_path):
    """Every shard truncated before its first sample: a reader's pass yields nothing, and looping again
    would never end. Run in a subprocess so that a hang fails the test instead of the suite."""
    from tests._data import write_shards

    for path in write_shards(str(tmp_path), [4, 4]):
        with open(path, "r+b") as f:
            f.truncate(300)
    code = ("from datamodules import ImageTextDataModule\n"
            f"dm = ImageTextDataModule(shards={{'train': {str(tmp_path)!r}, 'validate': False, 'samples_per_epoch': 8}},"
            " stream={'num_workers': 0, 'batch_size': 2})\n"
            "dm.setup('fit')\nlist(dm.train_dataloader())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode != 0 and "none of its shards yielded a sample in a whole pass" in res.stderr, res.stderr[-2000:]
