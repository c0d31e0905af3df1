"""The reliability probe, part 2: faults that need a run (see ``test_faults.py`` for the single-call ones).

Interrupted writes, resume in place with overrides, ``--ckpt_path last``, bounded retention, remote
checkpoint folders, ``default_root_dir``, ``predict``, CAFA statistics following their checkpoint,
zero-shot label checks and strict JSON, and a ``kill -9`` mid-epoch compared batch by batch with
an uninterrupted run.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from datamodules import ShardError
from tests.test_faults import DIGITS, QUICK, ROOT, _tiny_classifier_ckpt, run_cli


def test_failed_setup_leaves_no_run_folder(in_tmp):
    with pytest.raises(ShardError, match="do not exist"):
        run_cli("fit", "-c", DIGITS, "--data.init_args.generate=null", "--data.init_args.shards.train=nowhere/train",
                *QUICK)
    assert not glob.glob("runs/mmalign/version_*")


def test_nan_guard_advice_is_followable(in_tmp):
    from mmalign.training.callbacks import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"--ckpt_path last --model.init_args.optim.lr=0.0015"):
        run_cli("fit", "-c", DIGITS, "--model.class_path=tests.test_cli.NaNAfterTwo", "--trainer.max_steps=4",
                "--checkpoint.every_n_train_steps=1", *QUICK)


def test_final_model_saved_and_retention_bounded(in_tmp):
    c = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=9", "--checkpoint.every_n_train_steps=2", *QUICK)
    ckdir = os.path.join(c.trainer.log_dir, "checkpoints")
    # the 3 newest step checkpoints (step 2 was dropped), and last.ckpt at the final step (9), not at
    # the last multiple of every_n_train_steps (8)
    assert sorted(os.listdir(ckdir)) == ["last.ckpt", "step0000004.ckpt", "step0000006.ckpt", "step0000008.ckpt"]
    assert torch.load(os.path.join(ckdir, "last.ckpt"), weights_only=True)["global_step"] == 9
    assert torch.load(os.path.join(ckdir, "step0000008.ckpt"), weights_only=True)["global_step"] == 8


def test_resume_applies_overrides_and_finds_last(in_tmp, capsys):
    c1 = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=3", "--checkpoint.every_n_train_steps=1", *QUICK)
    ckdir = os.path.join(c1.trainer.log_dir, "checkpoints")
    open(os.path.join(ckdir, "last.ckpt.tmp-999999"), "wb").write(b"half a checkpoint")  # a killed write
    c2 = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=5", "--ckpt_path=last", "--model.init_args.optim.lr=1.5e-3",
                 *QUICK)
    err = capsys.readouterr()
    assert c2.trainer.global_step == 5 and c2.trainer.log_dir == c1.trainer.log_dir
    assert "lr 0.003 -> 0.0015" in err.err and "applied to the restored optimizer: lr 0.003 -> 0.0015" in err.out
    assert not os.path.exists(os.path.join(ckdir, "last.ckpt.tmp-999999"))
    # the restored optimizer and scheduler follow the new lr (half of what the checkpoint held)
    opt = c2.trainer.optimizers[0]
    sched = c2.trainer.lr_scheduler_configs[0].scheduler
    assert all(abs(b - 1.5e-3) < 1e-12 for b in sched.base_lrs) and opt.param_groups[0]["initial_lr"] == 1.5e-3


def test_ckpt_path_last_without_runs_says_so(in_tmp, capsys):
    c = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=1", "--ckpt_path=last", *QUICK)
    assert c.trainer.global_step == 1 and "no checkpoint found" in capsys.readouterr().err


def test_missing_ckpt_path_is_named(in_tmp):
    with pytest.raises(FileNotFoundError, match="ckpt_path 'gone.ckpt' does not exist"):
        run_cli("fit", "-c", DIGITS, "--ckpt_path=gone.ckpt", *QUICK)


def test_remote_checkpoint_dirpath_is_honoured(in_tmp):
    import fsspec

    run_cli("fit", "-c", DIGITS, "--trainer.max_steps=2", "--checkpoint.dirpath=memory://ckpts/run", *QUICK)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/ckpts/run/last.ckpt") and not glob.glob("memory:*") and not glob.glob("**/memory:*")
    with fs.open("/ckpts/run/last.ckpt", "rb") as f:
        assert torch.load(f, weights_only=True)["global_step"] == 2


def test_default_root_dir_moves_runs(in_tmp):
    c = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=1", "--trainer.default_root_dir=elsewhere", *QUICK)
    assert os.path.isdir("elsewhere/mmalign/version_0/checkpoints") and not os.path.exists("runs")
    assert c.trainer.log_dir.startswith("elsewhere")


def test_predict_writes_classifier_predictions(in_tmp):
    c = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=2", *QUICK)
    last = os.path.join(c.trainer.log_dir, "checkpoints", "last.ckpt")
    from mmalign.training.callbacks import PredictionWriter

    p = run_cli("predict", "-c", DIGITS, "--ckpt_path", last, "--trainer.limit_predict_batches=2", *QUICK)
    [writer] = [cb for cb in p.trainer.callbacks if isinstance(cb, PredictionWriter)]
    rows = [json.loads(x) for x in open(writer.written)]
    assert len(rows) == 2 * 64 and {"key", "pred", "confidence", "top5", "label"} <= set(rows[0])
    assert 0 <= rows[0]["pred"] < 10 and len(rows[0]["top5"]) == 5


def test_predict_writes_repa_sample_grids(in_tmp):
    p = run_cli("predict", "-c", os.path.join(ROOT, "configs/repa/dit_base.yaml"), "--allow_random_weights=true",
                "--model.init_args.fd.num_samples=0",
                "--model.init_args.sampling.num_samples=4", "--model.init_args.sampling.steps=2",
                "--model.init_args.sampling.out_dir=grids", "--model.init_args.diffusion.backbone_kwargs.num_layers=1",
                *QUICK)
    assert p.trainer.predict_loop.batch_progress.total.completed == 1
    assert len(glob.glob("grids/samples_rank0_*.png")) == 1


def test_cafa_statistics_follow_the_source_checkpoint(tmp_path, data_root):
    from mmalign.tta.module import TTAModel
    from mmalign.tta.pipeline import source_statistics
    from mmalign.tta.stream import CorruptionStream

    ckpt = _tiny_classifier_ckpt(tmp_path / "src.ckpt")
    logs = []

    def stats():
        model = TTAModel(ckpt, methods=["cafa"])
        dm = CorruptionStream(shards={"data_root": data_root, "train": "digits/train"}, stream={"num_workers": 0},
                              benchmark={"dir": str(tmp_path)}, preprocess=model.preprocess)
        return source_statistics(model, dm, str(tmp_path), "cpu", logs.append, max_samples=64)

    first = stats()
    assert first.source["sha256"] and os.path.isfile(tmp_path / "src.cafa_stats.pt")
    assert stats().means.equal(first.means) and "from" in logs[-1]  # same checkpoint: loaded
    _tiny_classifier_ckpt(ckpt)  # retrained: other weights under the same name
    stats()
    assert "recomputing" in logs[-2] and "->" in logs[-1]


def test_zeroshot_unknown_label_field_and_strict_json(in_tmp, data_root):
    import yaml

    from mmalign.jsonout import strict as _strict
    from tests.test_contrastive_module import TINY

    cfg = {"model": {"class_path": "mmalign.contrastive.CLIP",
                     "init_args": {"model": {"name": "mmalign-test-tiny", "cfg": TINY}}},
           "data": {"class_path": "datamodules.ImageLabelDataModule",
                    "init_args": {"shards": {"data_root": data_root, "test": "shapes/heldout"},
                                  "stream": {"num_workers": 0, "batch_size": 32}}},
           "trainer": {"enable_progress_bar": False, "logger": False, "limit_test_batches": 1}}
    (in_tmp / "zs.yaml").write_text(yaml.safe_dump(cfg))
    classes = os.path.join(data_root, "shapes", "classes.json")
    with pytest.raises(ValueError, match="no test sample carries label field 'colour_id'.*json fields seen: .*color_id"):
        run_cli("zeroshot", "-c", "zs.yaml", f"--classes={classes}", "--label_field=colour_id", "--out=zs",
                "--allow_random_weights=true")
    run_cli("zeroshot", "-c", "zs.yaml", f"--classes={classes}", "--label_field=cls", "--out=zs",
            "--allow_random_weights=true")
    text = (in_tmp / "zs" / "zeroshot.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert "NaN" not in text and _strict({"x": float("nan")}) == {"x": None}


# ---- kill -9 and resume ---------------------------------------------------------------------------

def _fit(record, extra, cwd, env):
    return subprocess.Popen([sys.executable, "-m", "mmalign", "fit", "-c", DIGITS,
                             "--model.class_path=tests._modules.RecordingClassifier",
                             f"--model.init_args.record={record}", "--trainer.max_steps=20",
                             "--checkpoint.every_n_train_steps=4", "--data.init_args.stream.num_workers=2",
                             "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                             "--trainer.enable_model_summary=false", *extra],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _batches(path):
    by_step = {}
    for line in open(path):
        row = json.loads(line)
        by_step[row["step"]] = (row["keys"], row["pixels"])  # a replayed step overwrites the lost one
    return by_step


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_sees_the_uninterrupted_batches(tmp_path, data_root):
    """digits: 19 batches per epoch, 20 steps (the resumed part crosses into epoch 1), checkpoints
    every 4. Kill the run with SIGKILL once it has stepped 11 times (mid-epoch, between the step-8 and
    step-12 checkpoints), resume with --ckpt_path last: every step's batch (keys and pixel digest)
    equals the uninterrupted run's, and the run finishes in its own folder."""
    env = {**os.environ, "MMALIGN_DATA": data_root, "PYTHONPATH": ROOT}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref = _fit(str(tmp_path / "ref.jsonl"), [], str(tmp_path / "a"), env)
    killed = _fit(str(tmp_path / "run.jsonl"), [], str(tmp_path / "b"), env)
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        if os.path.exists(tmp_path / "run.jsonl") and len(open(tmp_path / "run.jsonl").readlines()) >= 11:
            break
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    resumed = _fit(str(tmp_path / "run.jsonl"), ["--ckpt_path=last"], str(tmp_path / "b"), env)
    assert resumed.wait(timeout=400) == 0, resumed.stderr.read()[-3000:]
    assert ref.wait(timeout=400) == 0, ref.stderr.read()[-3000:]
    want, got = _batches(tmp_path / "ref.jsonl"), _batches(tmp_path / "run.jsonl")
    assert sorted(want) == sorted(got) == list(range(20))
    assert [got[s] for s in range(20)] == [want[s] for s in range(20)]
    runs = glob.glob(str(tmp_path / "b" / "runs/mmalign/version_*"))
    assert len(runs) == 1  # resumed in the same version folder
    last = torch.load(os.path.join(runs[0], "checkpoints", "last.ckpt"), weights_only=True)
    assert last["global_step"] == 20


def test_evaluating_a_checkpoint_builds_its_architecture(in_tmp, capsys):
    """``test``/``zeroshot``/``predict`` with --ckpt_path use the network the checkpoint holds, even when
    the config describes another (here: wider channels); ``fit`` keeps the config's."""
    c1 = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=2", *QUICK)
    last = os.path.join(c1.trainer.log_dir, "checkpoints", "last.ckpt")
    other = '--model.init_args.network.kwargs={"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}'
    c2 = run_cli("test", "-c", DIGITS, other, f"--ckpt_path={last}", "--trainer.limit_test_batches=1", *QUICK)
    assert "architecture taken from the checkpoint (network.kwargs" in capsys.readouterr().err
    trained = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.equal(v, trained[k]) for k, v in c2.model.state_dict().items())
