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
