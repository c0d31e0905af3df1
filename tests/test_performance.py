"""Start-up and per-step overhead: what the CLI imports, the NaN guard's host reads, cached shard indexes."""

import glob
import os
import subprocess
import sys

import pytest
import torch

from mmalign import cli
from mmalign.classify import ImageClassifier
from mmalign.training.callbacks import NaNGuard, NonFiniteLossError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs/classify/digits.yaml")
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
         "--data.init_args.stream.num_workers=0", "--trainer.enable_model_summary=false"]


def test_import_and_help_do_not_import_lightning():
    code = ("import sys\nimport mmalign.cli as c\nprint('AFTER_IMPORT', sorted(m for m in ('lightning', 'torch') "
            "if m in sys.modules))\ntry:\n    c.main(['--help'])\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
            "print('AFTER_HELP', sorted(m for m in ('lightning', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "AFTER_IMPORT []" in out.stdout and "AFTER_HELP []" in out.stdout and "EXIT 0" in out.stdout, \
        out.stdout[-800:] + out.stderr[-2000:]
    # the help still names every subcommand with its docstring's first line
    assert "zeroshot" in out.stdout and "Zero-shot classification" in out.stdout
    assert "precompute_teacher" in out.stdout and "fit" in out.stdout


def test_lightning_subcommands_listed_without_lightning_match_lightning():
    from lightning.pytorch.cli import LightningCLI

    assert set(cli.LIGHTNING_SUBCOMMANDS) == set(LightningCLI.subcommands())
    assert cli.MMAlignCLI is cli._cli_classes()[0]  # the lazily built class is still reachable by name


def test_nan_guard_refuses_a_zero_interval():
    with pytest.raises(ValueError, match="check_every_n_steps=0"):
        NaNGuard(0)


class NaNAfterTwo(ImageClassifier):  # the digits classifier with a NaN loss from global step 2 on
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 2 else loss


def test_deferred_nan_guard_reads_before_every_checkpoint(in_tmp):
    """Read every 5 steps (as on an accelerator): the NaN of step 2 is found before the checkpoint of
    step 3 is written, named with its step, and the last checkpoint on disk is the finite one of step 2."""
    with pytest.raises(NonFiniteLossError, match="non-finite loss at global step 2.*before writing a checkpoint"):
        cli.main(["fit", "-c", DIGITS, "--model.class_path=tests.test_performance.NaNAfterTwo", "--trainer.max_steps=8",
                  "--checkpoint.every_n_train_steps=1", "--nan_check_every_n_steps=5", *QUICK])
    [last] = glob.glob("runs/mmalign/version_*/checkpoints/last.ckpt")
    ck = torch.load(last, weights_only=False)
    assert ck["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_deferred_nan_guard_reads_at_its_interval(in_tmp):
    """No checkpoint in between: the periodic read at step 5 stops the run, not the end of training."""
    with pytest.raises(NonFiniteLossError, match="global step 2.*at the periodic check \\(step 5\\)"):
        cli.main(["fit", "-c", DIGITS, "--model.class_path=tests.test_performance.NaNAfterTwo", "--trainer.max_steps=9",
                  "--checkpoint.every_n_train_steps=100", "--nan_check_every_n_steps=5", *QUICK])


def test_channels_last_tower_computes_the_same_features():
    from tests.test_contrastive_module import batch, tiny

    plain, fast = tiny(), tiny(model={"channels_last": True})
    conv = fast.model.visual.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    b = batch(n=4)
    for a, c in zip(plain.encode(b["image"], b["tokens"]), fast.encode(b["image"], b["tokens"])):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_thread_options_are_applied_and_checked(in_tmp, capsys):
    before = torch.get_num_threads()
    try:
        cli.main(["-c", DIGITS, "--torch_threads=1", "--trainer.max_steps=1", *QUICK], run=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        cli.main(["-c", DIGITS, "--torch_threads=0", *QUICK], run=False)
    assert "torch_threads=0: give a thread count >= 1" in capsys.readouterr().err


def _write_shard(path, n):
    import io
    import tarfile

    with tarfile.open(path, "w") as t:
        for i in range(n):
            for ext, data in (("txt", b"a caption"), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def test_shard_index_is_cached_beside_the_shards_and_rescanned_when_changed(tmp_path, monkeypatch):
    from datamodules import shards

    shard = str(tmp_path / "a.tar")
    _write_shard(shard, 3)
    first = shards.index_shard(shard, ("cls",), (("txt",),))
    assert first.num_samples == 3 and first.texts["s002"] == {"cls": "2"}
    assert (tmp_path / ".mmalign-index" / "a.tar.json").is_file()

    def no_scan(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr(shards, "_scan_tar", no_scan)
    assert shards.index_shard(shard, ("cls",), (("txt",),)) == first  # served from the cache
    with pytest.raises(AssertionError, match="scanned again"):  # other members asked for: a fresh scan
        shards.index_shard(shard, (), (("txt",),))
    monkeypatch.undo()
    _write_shard(shard, 5)  # rewritten: size (and mtime) differ
    assert shards.index_shard(shard, ("cls",), (("txt",),)).num_samples == 5


def test_progress_bar_reads_logged_metrics_only_every_n_steps(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from mmalign.training.callbacks import SyncFreeRichProgressBar

    class Logs(BoringModel):
        def training_step(self, batch, batch_idx):
            self.log("seen", float(self.global_step), prog_bar=True)
            return super().training_step(batch, batch_idx)

    class Recorder(SyncFreeRichProgressBar):
        shown = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.shown.append(self.get_metrics(trainer, pl_module)["seen"])

    bar = Recorder(metrics_every_n_steps=3)
    trainer = pl.Trainer(max_steps=7, callbacks=[bar], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(Logs())
    # read at steps 1 (first), 3 and 6: the value logged in the step before each read
    assert bar.shown == [0.0, 0.0, 2.0, 2.0, 2.0, 5.0, 5.0]


def test_a_finished_command_exits_zero_after_atexit_handlers_and_writes_its_files(in_tmp):
    """``python -m mmalign`` skips the interpreter's teardown (``exit_fast``): the exit status, the run's
    files and the atexit handlers must survive that."""
    code = ("import atexit, runpy, sys\natexit.register(lambda: open('atexit-ran', 'w').write('yes'))\n"
            f"sys.argv = ['mmalign', 'fit', '-c', {DIGITS!r}, '--trainer.max_steps=2', *{QUICK!r}]\n"
            "runpy.run_module('mmalign', run_name='__main__')\nprint('NOT REACHED')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NOT REACHED" not in out.stdout  # the process ended in exit_fast
    assert (in_tmp / "atexit-ran").read_text() == "yes"
    [metrics] = glob.glob("runs/mmalign/version_*/metrics.csv")
    assert glob.glob("runs/mmalign/version_*/checkpoints/last.ckpt") and open(metrics).read().strip()
