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
    args = [sys.executable, "-m", "mmalign", "fit", "-c", DIGITS,
            "--model.class_path=tests._modules.RecordingClassifier",
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_with_more_workers_continues_from_the_global_position(stopped_run, tmp_path):
    """num_workers 0 -> 2: other readers, same epoch: it continues at batch 8 of 19 and ends there."""
    err, records, steps = _resume(stopped_run, tmp_path, "--data.init_args.stream.num_workers=2", max_steps=21)
    assert "readers per rank 1 -> 2" in err and "continues from sample 512 of 1259 (batch 8 of 19" in err, err[-2000:]
    epochs = _epoch_of(records)
    assert all(epochs[s] == {0} for s in range(19)) and epochs[19] == epochs[20] == {1}
    assert {12, 16, 20, 21} <= set(steps)


@pytest.mark.slow
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


@pytest.mark.slow
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
            f"dm = ImageTextDataModule(shards={{'train': {str(tmp_path)!r}, 'validate': False, "
            "'samples_per_epoch': 8},"
            " stream={'num_workers': 0, 'batch_size': 2})\n"
            "dm.setup('fit')\nlist(dm.train_dataloader())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode != 0, res.stderr[-2000:]
    assert "none of its shards yielded a sample in a whole pass" in res.stderr, res.stderr[-2000:]


# ---- malformed side files, read-only data roots, stray generation folders ---------------------------

@pytest.mark.parametrize("content, message", [
    ("{not json", r"sizes.json' is not a readable sizes file .*Fix it, or delete it"),
    ("[1, 2]", r"sizes.json' holds a list, not a mapping"),
    ('{"s-0000.tar": -3}', r"the count of 's-0000.tar' is -3, not a whole number >= 0"),
    ('{"s-0000.tar": "many"}', r"the count of 's-0000.tar' is 'many'"),
])
def test_a_malformed_sizes_file_is_named_with_the_fix(tmp_path, content, message):
    from datamodules import ImageTextDataModule, ShardError
    from tests._data import write_shards

    write_shards(str(tmp_path), [4, 4])
    (tmp_path / "sizes.json").write_text(content)
    dm = ImageTextDataModule(shards={"train": str(tmp_path)}, stream={"num_workers": 0, "batch_size": 2})
    with pytest.raises(ShardError, match=message):
        dm.setup("fit")


@pytest.mark.parametrize("content, message", [
    ("{oops", r"label.classes: '.*classes.json' is not valid JSON"),
    ('{"cat": "three"}', r"holds neither a list of names nor name -> index"),
    ('["cat", "cat"]', r"names a class twice"),
])
def test_a_malformed_class_index_file_is_named_with_the_fix(tmp_path, content, message):
    from datamodules import DataConfigError, ImageLabelDataModule
    from tests._data import write_shards

    write_shards(str(tmp_path / "d"), [4], label_of=lambda n: "cat")
    (tmp_path / "classes.json").write_text(content)
    dm = ImageLabelDataModule(shards={"train": str(tmp_path / "d")}, stream={"num_workers": 0, "batch_size": 2},
                              label={"classes": str(tmp_path / "classes.json")})
    with pytest.raises(DataConfigError, match=message):
        dm.setup("fit")


def test_a_damaged_info_file_of_a_generated_dataset_says_regenerate(tmp_path):
    from datamodules import ImageLabelDataModule

    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "info.json").write_text("{half a file")
    dm = ImageLabelDataModule(shards={"data_root": str(tmp_path), "train": "digits/train"}, generate="digits")
    with pytest.raises(ValueError, match=r"info.json' is not readable JSON .*damaged. Delete '.*digits' to regenerate"):
        dm.prepare_data()


@pytest.mark.parametrize("where", ["file", "sys"])
def test_generation_into_a_data_root_it_cannot_write_fails_before_work(tmp_path, where):
    from datamodules import ImageLabelDataModule

    if where == "file":
        (tmp_path / "afile").write_text("x")
        root = str(tmp_path / "afile" / "data")  # its parent is a file
    else:
        root = "/sys/mmalign-test-data"  # read-only for every user, root included
        if not os.path.isdir("/sys"):
            pytest.skip("no /sys here")
    dm = ImageLabelDataModule(shards={"data_root": root, "train": "digits/train"}, generate="digits")
    with pytest.raises(PermissionError, match=r"cannot write the built-in 'digits' dataset into .*Point "
                                              r"shards.data_root \(or MMALIGN_DATA\) at a writable folder"):
        dm.prepare_data()


def test_a_stray_folder_of_a_killed_generation_is_removed_at_the_next_start(tmp_path):
    from datamodules.generate import OWNER_FILE, generate_dataset

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    strays = {".digits-killed": {"host": socket.gethostname(), "pid": int(dead.stdout)},
              ".digits-live": {"host": socket.gethostname(), "pid": os.getpid()},
              ".digits-other-node": {"host": "some-other-node", "pid": 1}, ".digits-old": None}
    for name, owner in strays.items():
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "train" / "shard-000000.tar").write_bytes(b"half")
        if owner is not None:
            (tmp_path / name / OWNER_FILE).write_text(json.dumps(owner))
    os.utime(tmp_path / ".digits-old", (0, 0))  # from an older version: no owner, long untouched
    generate_dataset("digits", str(tmp_path / "digits"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".digits-live", ".digits-other-node", "digits"], left


# ---- an evaluation set smaller than the world size ------------------------------------------------

def _tiny_val_setup(rank, world, directory):
    from datamodules import ImageTextDataModule

    dm = ImageTextDataModule(shards={"val": directory}, stream={"num_workers": 0, "batch_size": 2})
    try:
        dm.setup("validate")
    except Exception as exc:  # reported as a value: every rank must fail the same way, at set-up
        return f"{type(exc).__name__}: {exc}"
    return "ok"


@pytest.mark.distributed
def test_an_eval_set_smaller_than_the_world_fails_at_setup_on_every_rank(tmp_path):
    from tests._data import write_shards
    from tests._dist import run_distributed

    write_shards(str(tmp_path / "one"), [1])
    write_shards(str(tmp_path / "two"), [2])
    assert run_distributed(_tiny_val_setup, 2, (str(tmp_path / "two"),)) == ["ok", "ok"]
    out = run_distributed(_tiny_val_setup, 2, (str(tmp_path / "one"),))
    assert out[0] == out[1] and out[0].startswith("ShardError: shards.val: 1 evaluation sample(s) for 2 ranks; "
                                                  "every rank needs at least one"), out


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_fit_with_an_eval_set_smaller_than_the_world_stops_before_training(tmp_path, data_root):
    res = _fit(tmp_path, data_root, tmp_path / "b.jsonl", "--trainer.max_steps=2",
               "--data.init_args.eval.max_samples=1", devices=2, timeout=300)
    assert res.returncode != 0
    assert "shards.val: 1 evaluation sample(s) for 2 ranks; every rank needs at least one" in res.stderr
    assert "Connection closed" not in res.stderr and not os.path.exists(tmp_path / "b.jsonl")


# ---- the inputs real users bring: image modes, label spellings, folder layouts, captions ----------

def _image_file(path, mode):
    """One 8 x 8 image of ``mode``; returns the RGB the decoder must give for pixel (0, 0) and (7, 7)."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "L":
        Image.new("L", (8, 8), 100).save(path)
        return (100,) * 3, (100,) * 3
    if mode == "LA":  # left half opaque grey, right half transparent
        arr = np.zeros((8, 8, 2), np.uint8)
        arr[..., 0], arr[:, :4, 1] = 100, 255
        Image.fromarray(arr, "LA").save(path)
        return (100,) * 3, (255,) * 3
    if mode == "P":  # palette: colour 0 red, colour 1 transparent (stored black)
        img = Image.new("P", (8, 8), 0)
        img.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
        img.paste(1, (4, 4, 8, 8))
        img.save(path, transparency=1)
        return (255, 0, 0), (255, 255, 255)
    if mode == "RGBA":
        arr = np.zeros((8, 8, 4), np.uint8)
        arr[...] = (10, 20, 30, 255)
        arr[4:, 4:, 3] = 0
        Image.fromarray(arr, "RGBA").save(path)
        return (10, 20, 30), (255, 255, 255)
    if mode == "CMYK":
        Image.new("RGB", (8, 8), (200, 40, 40)).convert("CMYK").save(path, quality=100)
        return (200, 40, 40), (200, 40, 40)
    if mode == "I;16":  # 16-bit grey PNG: 25700 / 257 = 100, not clipped to 255
        Image.fromarray(np.full((8, 8), 25700, np.uint16)).save(path)
        return (100,) * 3, (100,) * 3
    if mode == "1":
        img = Image.new("1", (8, 8), 0)
        img.paste(1, (4, 4, 8, 8))
        img.save(path)
        return (0,) * 3, (255,) * 3
    if mode == "gray-jpeg":
        Image.new("L", (8, 8), 100).save(path, quality=100)
        return (100,) * 3, (100,) * 3
    if mode == "exif-rotated":  # stored 8 wide x 4 high, red left half; orientation 6 = shown turned 90 deg clockwise
        arr = np.zeros((4, 8, 3), np.uint8)
        arr[:, :4] = (255, 0, 0)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(arr).save(path, exif=exif, quality=100)
        return (255, 0, 0), (0, 0, 0)  # upright: 4 wide x 8 high, red on top
    raise ValueError(mode)


MODES = {"L": "png", "LA": "png", "P": "png", "RGBA": "png", "CMYK": "jpg", "I;16": "png", "1": "png",
         "gray-jpeg": "jpg", "exif-rotated": "jpg"}


def test_every_image_mode_and_bit_depth_decodes_to_the_colours_a_viewer_shows(tmp_path):
    from torchvision.transforms import PILToTensor

    from datamodules import ImageLabelDataModule, Preprocess

    expected = {}
    for i, (mode, ext) in enumerate(MODES.items()):
        expected[f"c/{i}"] = (mode, _image_file(str(tmp_path / "c" / f"{i}.{ext}"), mode))
    dm = ImageLabelDataModule(shards={"test": str(tmp_path)}, stream={"num_workers": 0, "batch_size": 4},
                              preprocess=Preprocess(eval_transform=PILToTensor()))
    dm.setup("test")
    ds = dm._eval["test"]
    assert len(ds) == len(MODES)
    for i in range(len(ds)):
        sample = ds[i]
        mode, (first, last) = expected[sample["key"]]
        img = sample["image"]
        assert img.shape[0] == 3 and img.dtype == torch.uint8, mode
        if mode == "exif-rotated":
            assert tuple(img.shape[1:]) == (8, 4), "EXIF orientation not applied"
        tol = 12 if MODES[mode] == "jpg" else 0
        for (y, x), want in (((0, 0), first), ((img.shape[1] - 1, img.shape[2] - 1), last)):
            got = img[:, y, x].tolist()
            assert all(abs(g - w) <= tol for g, w in zip(got, want)), (mode, (y, x), got, want)


def _label_shards(directory, labels, key="cls"):
    from datamodules.shards import write_shard
    from tests._data import png_bytes

    samples = []
    for i, label in enumerate(labels):
        sample = {"__key__": f"k{i:03d}", "png": png_bytes(i)}
        if key == "cls":
            sample["cls"] = label if isinstance(label, bytes) else str(label).encode()
        else:
            sample["json"] = json.dumps({key: label}).encode()
        samples.append(sample)
    os.makedirs(directory, exist_ok=True)
    write_shard(os.path.join(directory, "s-0000.tar"), samples, encoder=False)


def _labels_of(directory, **label):
    from datamodules import ImageLabelDataModule

    dm = ImageLabelDataModule(shards={"test": str(directory)}, stream={"num_workers": 0, "batch_size": 16},
                              label=label, image={"size": 8})
    dm.setup("test")
    return [int(v) for b in dm.test_dataloader() for v in b["label"]]


def test_every_label_spelling_reads_as_its_class(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps({"classnames": ["dog", "bird", "fish", "cat"]}))
    _label_shards(tmp_path / "cls", ["3", " 3\n", "3.0", "cat", "0"])
    assert _labels_of(tmp_path / "cls", classes=str(tmp_path / "classes.json")) == [3, 3, 3, 3, 0]
    _label_shards(tmp_path / "json", [3, 3.0, "3", " 3 ", "cat"], key="label")
    assert _labels_of(tmp_path / "json", key="label", classes=str(tmp_path / "classes.json")) == [3] * 5
    (tmp_path / "wnids.txt").write_text("n01 tench\nn02 goldfish\n")  # ImageNet's LOC_synset_mapping.txt shape
    _label_shards(tmp_path / "wnid", ["n02", "n01"])
    assert _labels_of(tmp_path / "wnid", classes=str(tmp_path / "wnids.txt")) == [1, 0]


@pytest.mark.parametrize("labels, label, message", [
    (["1", "-1"], {}, r"k001: label '-1' is not a class index \(a whole number >= 0\)"),
    (["1", "2.5"], {}, r"k001: label '2.5' is not a class index"),
    (["1", "cat"], {}, r"k001: label 'cat' is not a number. Set label.classes"),
    (["1", b"\xff\xfe"], {}, r"k001: label '\ufffd\ufffd' is not a number"),  # not UTF-8
    (["1", "7"], {"num_classes": 5}, r"k001: label 7 is outside \[0, 5\)"),
    (["1", "lion"], {"classes": "CLASSES"}, r"k001: class 'lion' is not in the class-index file \(4 classes"),
])
def test_a_label_that_is_no_class_index_is_refused_with_one_line(tmp_path, labels, label, message):
    from datamodules import DataConfigError

    (tmp_path / "classes.json").write_text(json.dumps(["dog", "bird", "fish", "cat"]))
    label = {k: str(tmp_path / "classes.json") if v == "CLASSES" else v for k, v in label.items()}
    _label_shards(tmp_path / "d", labels)
    with pytest.raises(DataConfigError, match=message):
        _labels_of(tmp_path / "d", **label)


def _folder_labels(root, **label):
    from datamodules import ImageLabelDataModule

    dm = ImageLabelDataModule(shards={"test": str(root)}, stream={"num_workers": 0, "batch_size": 32},
                              label=label, image={"size": 8})
    dm.setup("test")
    return sorted((k, int(v)) for b in dm.test_dataloader() for k, v in zip(b["key"], b["label"])), dm.health


def test_every_folder_layout_gives_the_right_labels(tmp_path):
    root = tmp_path / "pets"
    _save(str(root / "cat" / "a" / "b" / "deep.png"), 10)  # nested below its class folder
    _save(str(root / "cat" / "UPPER.PNG"), 20)  # upper-case extension
    _save(str(root / "cat" / ".ipynb_checkpoints" / "copy-checkpoint.png"), 30)  # hidden folder: not data
    (root / "cat" / "._UPPER.PNG").write_bytes(b"\x00\x05\x16\x07 macOS metadata")  # AppleDouble: not an image
    (root / "cat" / ".DS_Store").write_bytes(b"\x00")
    (root / "cow").mkdir()  # an empty class folder keeps its index (cow = 1)
    _save(str(root / "dog" / "IMG.JPG"), 40, "JPEG")
    _save(str(tmp_path / "elsewhere" / "outside.png"), 50)
    os.symlink(tmp_path / "elsewhere" / "outside.png", root / "dog" / "linked.png")  # a symlinked file
    _save(str(tmp_path / "fishes" / "f.png"), 60)
    os.symlink(tmp_path / "fishes", root / "fish")  # a symlinked class folder
    (root / ".hidden_class").mkdir()
    _save(str(root / ".hidden_class" / "x.png"), 70)
    got, health = _folder_labels(root)
    assert got == [("cat/UPPER", 0), ("cat/a/b/deep", 0), ("dog/IMG", 2), ("dog/linked", 2), ("fish/f", 3)]
    assert not health.totals  # nothing skipped: the hidden files were never read as images


def test_image_folders_with_different_class_folders_are_refused_or_mapped_by_name(tmp_path):
    from datamodules import DataConfigError, ImageLabelDataModule

    for split, classes in (("train", ("cat", "dog", "fish")), ("val", ("cat", "fish"))):
        for c in classes:
            _save(str(tmp_path / split / c / "x.png"), 10)
    dm = ImageLabelDataModule(shards={"train": str(tmp_path / "train"), "val": str(tmp_path / "val")},
                              stream={"num_workers": 0, "batch_size": 1}, image={"size": 8})
    with pytest.raises(DataConfigError, match=r"class folders of shards.train .* and shards.val .* differ "
                                              r"\(only in the first: \['dog'\].*set label.classes"):
        dm.setup("fit")
    (tmp_path / "classes.txt").write_text("cat\ndog\nfish\n")
    got, _ = _folder_labels(tmp_path / "val", classes=str(tmp_path / "classes.txt"))
    assert got == [("cat/x", 0), ("fish/x", 2)]  # fish is class 2 by name, not position 1 of this folder


def test_every_caption_size_is_read_or_skipped_and_counted(tmp_path):
    import open_clip

    from datamodules import ImageTextDataModule, Preprocess
    from datamodules.shards import write_shard
    from tests._data import png_bytes

    long = "a very long caption " * 400  # ~2000 tokens, beyond any text tower's context
    captions = {"k0": b"a cat", "k1": b"", "k2": b"   \n\t ", "k3": long.encode(), "k4": "caf\xe9".encode("latin-1"),
                "k5": "un caf\u00e9 \U0001F600".encode()}
    os.makedirs(tmp_path / "d")
    write_shard(str(tmp_path / "d" / "s-0000.tar"),
                [{"__key__": k, "png": png_bytes(i), "txt": t} for i, (k, t) in enumerate(captions.items())],
                encoder=False)
    tok = open_clip.get_tokenizer("ViT-B-32")
    dm = ImageTextDataModule(shards={"val": str(tmp_path / "d"), "max_skip_fraction": 1.0},
                             stream={"num_workers": 0, "batch_size": 8}, image={"size": 8},
                             preprocess=Preprocess(tokenizer=tok))
    dm.setup("validate")
    [batch] = list(dm.val_dataloader())
    assert batch["key"] == ["k0", "k3", "k5"] and batch["tokens"].shape == (3, 77)
    assert batch["text"][2] == "un caf\u00e9 \U0001F600" and batch["text"][1] == long.strip()
    report = dm.health.take("val")
    assert report.skipped == 3
    assert any("k4" in r and "caption is not UTF-8" in r for r in report.reasons), report.reasons
    assert sum("empty caption" in r for r in report.reasons) == 2


def test_a_json_caption_that_is_not_text_is_skipped_not_read_as_none(tmp_path):
    from datamodules import ImageTextDataModule
    from datamodules.shards import write_shard
    from tests._data import png_bytes

    os.makedirs(tmp_path / "d")
    write_shard(str(tmp_path / "d" / "s-0000.tar"),
                [{"__key__": f"k{i}", "png": png_bytes(i), "json": json.dumps({"caption": c}).encode()}
                 for i, c in enumerate(["a dog", None, ["a", "list"], 42])], encoder=False)
    dm = ImageTextDataModule(shards={"val": str(tmp_path / "d"), "max_skip_fraction": 1.0},
                             caption={"key": "json:caption"}, stream={"num_workers": 0, "batch_size": 8},
                             image={"size": 8})
    dm.setup("validate")
    [batch] = list(dm.val_dataloader())
    assert batch["text"] == ["a dog", "42"] and dm.health.take("val").skipped == 2
