import glob
import os
import subprocess
import sys

import pytest
import torch

from mmalign import cli
from mmalign.training.callbacks import NonFiniteLossError
from mmalign.training.checkpointing import AtomicCheckpointIO
from mmalign.classify import ImageClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs/classify/digits.yaml")
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
         "--data.init_args.stream.num_workers=0",
         "--trainer.enable_model_summary=false"]


def run_cli(*args):
    return cli.main(list(args))


def test_help_lists_subcommands_and_stays_light():
    # `python -m mmalign --help`, run as __main__, then a look at what it imported
    code = ("import runpy, sys\nsys.argv = ['mmalign', '--help']\ntry:\n    runpy.run_module('mmalign', "
            "run_name='__main__')\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
            "print('HEAVY', sorted(m for m in ('open_clip', 'diffusers', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    for sub in ("fit", "validate", "test", "predict", "zeroshot", "adapt", "precompute_teacher"):
        assert sub in out.stdout
    assert "EXIT 0" in out.stdout and "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]


@pytest.mark.parametrize("argv", [["--help"], ["data", "--help"]])
def test_help_into_a_closed_pipe_exits_quietly(argv):
    # `python -m mmalign --help | head -1`: the reader is gone before the help is written
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "mmalign", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_print_config_resolves_interpolation(in_tmp, capsys, data_root):
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", DIGITS, "--print_config")
    out = capsys.readouterr().out
    assert f"data_root: {data_root}" in out
    assert "num_classes: 10" in out and "${" not in out


def test_custom_subcommand_registration(in_tmp):
    calls = []

    def probe(trainer, model, datamodule, times: int = 1, label: str = "x"):
        """Probe subcommand for the test."""
        calls.append((type(model).__name__, type(datamodule).__name__, times, label))

    cli.register_subcommand("probe")(probe)
    try:
        run_cli("probe", "-c", DIGITS, "--times=3", "--label=yes", *QUICK)
    finally:
        cli._SUBCOMMANDS.pop("probe")
    assert calls == [("ImageClassifier", "ImageLabelDataModule", 3, "yes")]


def _steps_in_metrics(version_dir):
    import csv

    with open(os.path.join(version_dir, "metrics.csv")) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]


def test_checkpoints_written_and_resume_continues(in_tmp):
    c1 = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=4", "--checkpoint.every_n_train_steps=2",
                 "--trainer.log_every_n_steps=1", *QUICK)
    ckdir = os.path.join(c1.trainer.log_dir, "checkpoints")
    names = sorted(os.listdir(ckdir))
    assert names == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    assert not glob.glob(os.path.join(ckdir, "*.tmp-*"))
    assert torch.load(os.path.join(ckdir, "last.ckpt"), weights_only=False)["global_step"] == 4
    c2 = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=6", "--trainer.log_every_n_steps=1",
                 "--ckpt_path", os.path.join(ckdir, "last.ckpt"), *QUICK)
    assert c2.trainer.global_step == 6
    assert c2.trainer.log_dir == c1.trainer.log_dir  # the run continues in its own version folder
    assert glob.glob(os.path.join(c2.trainer.log_dir, "events.out.tfevents*"))
    steps = _steps_in_metrics(c2.trainer.log_dir)
    assert steps and max(steps) >= 5 and min(steps) <= 3  # one metrics.csv for the whole run


class NaNAfterTwo(ImageClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 2 else loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(in_tmp):
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* global step 2"):
        run_cli("fit", "-c", DIGITS, "--model.class_path=tests.test_cli.NaNAfterTwo", "--trainer.max_steps=6",
                "--checkpoint.every_n_train_steps=1", *QUICK)
    [last] = glob.glob("runs/mmalign/version_*/checkpoints/last.ckpt")
    ck = torch.load(last, weights_only=False)
    assert ck["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_atomic_checkpoint_survives_failed_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_cpu_processes_with_uneven_shards(in_tmp, data_root):
    # digits/train is 7 shards of 200,200,...,59 samples; 2 ranks x 2 workers read them unevenly.
    # A rank with fewer batches would leave the other waiting in all-reduce until the timeout.
    res = subprocess.run([sys.executable, "-m", "mmalign", "fit", "-c", DIGITS, "--trainer.strategy=ddp",
                          "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
                          "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
                          "--data.init_args.stream.num_workers=2", "--trainer.log_every_n_steps=1"],
                         capture_output=True, text=True, timeout=400, cwd=in_tmp,
                         env={**os.environ, "MMALIGN_DATA": data_root, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(glob.glob(str(in_tmp / "runs/mmalign/version_*"))) == 1  # rank 1 uses rank 0's claimed folder
    [last] = glob.glob(str(in_tmp / "runs/mmalign/version_*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=False)["global_step"] == 1259 // (2 * 64)


def test_installed_script_exits_zero_after_a_finished_fit(in_tmp, data_root):
    """The ``mmalign`` console script's wrapper is ``sys.exit(<entry point>())``: a finished fit must
    give status 0 (``main`` returns the CLI object, which ``sys.exit`` would print and turn into 1)."""
    from importlib.metadata import entry_points

    [ep] = [ep for ep in entry_points(group="console_scripts") if ep.name == "mmalign"]
    module, _, func = ep.value.partition(":")
    wrapper = (f"import sys; from {module} import {func}; sys.argv = ['mmalign'] + sys.argv[1:]; "
               f"sys.exit({func}())")
    res = subprocess.run([sys.executable, "-c", wrapper, "fit", "-c", DIGITS, "--trainer.max_steps=2",
                          "--trainer.limit_val_batches=1", *QUICK], capture_output=True, text=True, timeout=400,
                         cwd=in_tmp, env={**os.environ, "MMALIGN_DATA": data_root, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MMAlignCLI" not in res.stderr
    assert glob.glob(str(in_tmp / "runs/mmalign/version_*/checkpoints/last.ckpt"))
