"""Issue 24, the run mechanics: promises that must hold off the tested path.

Output locations checked before the first step, run folders claimed atomically by concurrent runs,
a NaN guard that looks at parameters and buffers, names and modules taken from a checkpoint that
cannot reach outside the run, refusal of random-weight evaluation, SIGTERM's exit status, a record
of each resumed segment, and one clear line for wrong checkpoints and unset environment variables.
Subprocess tests where a process must die or two must race.
"""

from __future__ import annotations

import glob
import re
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmalign.classify import ImageClassifier
from tests.test_faults import DIGITS, QUICK, ROOT, run_cli

RUN = ["--model.class_path=tests._modules.RecordingClassifier", "--model.init_args.record=steps.jsonl"]


def _steps_run(folder) -> int:
    path = os.path.join(str(folder), "steps.jsonl")
    return len(open(path).readlines()) if os.path.exists(path) else 0


# ---- item 3: every output location is checked before the first step --------------------------------

def test_checkpoint_dirpath_that_is_a_file_stops_before_training(in_tmp):
    from mmalign.training.outputs import OutputLocationError

    (in_tmp / "taken").write_text("a file, not a folder")
    with pytest.raises(OutputLocationError, match=r"checkpoint.* location .*taken is a file.*checkpoint\.dirpath"):
        run_cli("fit", "-c", DIGITS, *RUN, "--trainer.max_steps=3", "--checkpoint.dirpath=taken", *QUICK)
    assert _steps_run(in_tmp) == 0 and not glob.glob("runs/mmalign/version_*")


def test_unwritable_checkpoint_dirpath_stops_before_training(in_tmp):
    # /sys refuses new files even to root (a chmod'ed folder would not stop root)
    from mmalign.training.outputs import OutputLocationError

    with pytest.raises(OutputLocationError, match=r"not writable.*checkpoint\.dirpath"):
        run_cli("fit", "-c", DIGITS, *RUN, "--trainer.max_steps=3", "--checkpoint.dirpath=/sys/kernel/mmalign-ckpt",
                *QUICK)
    assert _steps_run(in_tmp) == 0


def test_run_folder_that_is_a_file_names_default_root_dir(in_tmp):
    from mmalign.training.outputs import OutputLocationError

    (in_tmp / "runs").write_text("not a folder")
    with pytest.raises(OutputLocationError, match=r"run folder.*runs.*is a file.*trainer\.default_root_dir"):
        run_cli("fit", "-c", DIGITS, *RUN, "--trainer.max_steps=3", *QUICK)
    assert _steps_run(in_tmp) == 0


def test_unknown_checkpoint_url_protocol_stops_before_training(in_tmp):
    from mmalign.training.outputs import OutputLocationError

    with pytest.raises(OutputLocationError, match=r"nosuchfs://bucket/ckpts.*checkpoint\.dirpath"):
        run_cli("fit", "-c", DIGITS, *RUN, "--trainer.max_steps=3", "--checkpoint.dirpath=nosuchfs://bucket/ckpts",
                *QUICK)
    assert _steps_run(in_tmp) == 0


def test_predict_output_checked_before_predicting(in_tmp):
    from mmalign.training.outputs import OutputLocationError

    c = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=1", *QUICK)
    last = os.path.join(c.trainer.log_dir, "checkpoints", "last.ckpt")
    (in_tmp / "elsewhere").write_text("a file")
    with pytest.raises(OutputLocationError, match=r"run folder.*elsewhere.*is a file.*trainer\.default_root_dir"):
        run_cli("predict", "-c", DIGITS, f"--ckpt_path={last}", "--trainer.default_root_dir=elsewhere", *QUICK)


# ---- item 4: two runs started together never share a version folder --------------------------------

class BarrierClassifier(ImageClassifier):
    """Waits in its constructor until ``parties`` processes have reached it: both runs have chosen
    their run folder (that happens before the model is built) and neither has written anything."""

    def __init__(self, barrier: str = "barrier", parties: int = 2, **kwargs) -> None:
        os.makedirs(barrier, exist_ok=True)
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        deadline = time.time() + 120
        while len(os.listdir(barrier)) < parties and time.time() < deadline:
            time.sleep(0.05)
        super().__init__(**kwargs)


def test_two_runs_started_together_claim_their_own_version(tmp_path, data_root):
    env = {**os.environ, "MMALIGN_DATA": data_root, "PYTHONPATH": ROOT}
    runs = [subprocess.Popen([sys.executable, "-m", "mmalign", "fit", "-c", DIGITS,
                              "--model.class_path=tests.test_reliability_runs.BarrierClassifier",
                              f"--model.init_args.barrier={tmp_path / 'barrier'}", "--trainer.max_steps=2",
                              "--checkpoint.every_n_train_steps=1", f"--seed_everything={i}", *QUICK],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    for p in runs:
        assert p.wait(timeout=400) == 0, p.stderr.read()[-3000:]
    versions = sorted(glob.glob(str(tmp_path / "runs/mmalign/version_*")))
    assert [os.path.basename(v) for v in versions] == ["version_0", "version_1"]
    seeds = set()
    for v in versions:
        assert sorted(os.listdir(os.path.join(v, "checkpoints"))) == ["last.ckpt", "step0000001.ckpt",
                                                                     "step0000002.ckpt"]
        [events] = glob.glob(os.path.join(v, "events.out.tfevents*"))  # each run's TensorBoard file, alone
        seeds.add(open(os.path.join(v, "config.yaml")).read().split("seed_everything: ")[1].split()[0])
        assert not glob.glob(os.path.join(v, "config.segment*"))
    assert seeds == {"0", "1"}  # each folder holds its own run's config


# ---- silent: resuming into a run folder keeps the record of each segment ----------------------------

def test_resume_into_another_runs_folder_keeps_each_segments_record(in_tmp):
    import yaml

    c1 = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=2", *QUICK)
    folder = c1.trainer.log_dir
    # "another experiment" (other weight decay, longer) picks that run with --ckpt_path last
    c2 = run_cli("fit", "-c", DIGITS, "--trainer.max_steps=4", "--ckpt_path=last", "--model.init_args.optim.weight_decay=0.01",
                 *QUICK)
    assert c2.trainer.log_dir == folder and c2.trainer.global_step == 4

    def read(name):
        return yaml.safe_load(open(os.path.join(folder, name)))

    assert read("config.yaml")["trainer"]["max_steps"] == 2 and read("hparams.yaml")["optim"]["weight_decay"] == 0.05
    assert read("config.segment1.yaml")["trainer"]["max_steps"] == 4
    assert read("hparams.segment1.yaml")["optim"]["weight_decay"] == 0.01
    run_cli("fit", "-c", DIGITS, "--trainer.max_steps=5", "--ckpt_path=last", *QUICK)
    assert read("config.segment2.yaml")["trainer"]["max_steps"] == 5 and read("config.yaml")["trainer"]["max_steps"] == 2


# ---- item 5: a checkpoint is called good only when parameters AND buffers are finite ----------------

def _finite(path) -> list[str]:
    sd = torch.load(path, weights_only=True)["state_dict"]
    return [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def test_nan_guard_sees_an_overflowed_buffer_before_the_loss(in_tmp):
    """lr=1e6 on digits: at step 3 a BatchNorm running variance overflows to inf while the loss is still
    finite. Training stops there, and no checkpoint holding inf is written."""
    from mmalign.training.callbacks import NonFiniteStateError

    with pytest.raises(NonFiniteStateError, match=r"running_var at global step 3.*NOT written.*--ckpt_path last "
                                                  r"--model.init_args.optim.lr=500000"):
        run_cli("fit", "-c", DIGITS, "--model.init_args.optim.lr=1e6", "--model.init_args.optim.warmup_steps=0",
                "--trainer.max_steps=30", "--checkpoint.every_n_train_steps=1", "--checkpoint.save_top_k=-1", *QUICK)
    ckpts = sorted(glob.glob("runs/mmalign/version_0/checkpoints/*.ckpt"))
    assert len(ckpts) == 3 and all(_finite(p) == [] for p in ckpts), {p: _finite(p) for p in ckpts}
    assert torch.load(ckpts[0], weights_only=True)["global_step"] == 2  # last.ckpt: the last good step


class InfBufferAtStep(ImageClassifier):
    """At step ``at`` a BatchNorm running variance becomes inf (as a corrupt batch would make it) while
    the loss stays finite: training mode normalises with the batch's own statistics."""

    def __init__(self, at: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at = at

    def on_after_backward(self) -> None:
        if self.global_step == self.at:
            bn = next(m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))


def test_nan_guard_resume_advice_works(in_tmp):
    from mmalign.training.callbacks import NonFiniteStateError

    with pytest.raises(NonFiniteStateError) as info:
        run_cli("fit", "-c", DIGITS, "--model.class_path=tests.test_reliability_runs.InfBufferAtStep",
                "--trainer.max_steps=6", "--checkpoint.every_n_train_steps=1", *QUICK)
    last = "runs/mmalign/version_0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3 and _finite(last) == []
    advice = str(info.value).split("(fit -c CONFIG ")[1].split(")")[0].split()  # --ckpt_path last --model...lr=X
    assert advice[:2] == ["--ckpt_path", "last"]
    c = run_cli("fit", "-c", DIGITS, "--model.class_path=tests.test_reliability_runs.InfBufferAtStep", *advice,
                "--model.init_args.at=-1", "--trainer.max_steps=6", "--checkpoint.every_n_train_steps=1", *QUICK)
    assert c.trainer.global_step == 6 and _finite(last) == []
    assert torch.load(last, weights_only=True)["global_step"] == 6


# ---- items 8, 9: names and modules taken from a checkpoint never reach outside the run --------------

def _clip_ckpt(path, **hparams) -> str:
    """A weights-only-safe mmalign CLIP checkpoint whose hyper-parameters are overridden by ``hparams``."""
    import lightning

    from tests.test_contrastive_module import tiny

    m = tiny()
    hp = {**dict(m.hparams), "_class_path": "mmalign.contrastive.CLIP"}
    hp["model"] = {**hp["model"], **hparams}  # the grouped layout: model.name, model.cfg
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": hp, "global_step": 5, "epoch": 0,
                "pytorch-lightning_version": lightning.__version__}, str(path))
    return str(path)


def _zeroshot_config(folder, data_root) -> str:
    import yaml

    from tests.test_contrastive_module import TINY

    cfg = {"model": {"class_path": "mmalign.contrastive.CLIP",
                     "init_args": {"model": {"name": "mmalign-test-tiny", "cfg": TINY}}},
           "data": {"class_path": "datamodules.ImageLabelDataModule",
                    "init_args": {"shards": {"data_root": data_root, "test": "shapes/heldout"},
                                  "stream": {"num_workers": 0, "batch_size": 32}}},
           "classes": os.path.join(data_root, "shapes", "classes.json"), "label_field": "cls",
           "trainer": {"enable_progress_bar": False, "logger": False, "limit_test_batches": 1}}
    path = os.path.join(str(folder), "zs.yaml")
    open(path, "w").write(yaml.safe_dump(cfg))
    return path


def _escaping_name(target) -> str:
    """A model name that, joined to open_clip's config folder of mmalign, lands on ``target``."""
    import tempfile

    return os.path.relpath(str(target), os.path.join(tempfile.gettempdir(), "mmalign-open_clip-config-folder"))


def test_zeroshot_model_name_from_a_checkpoint_is_never_a_path(in_tmp, data_root):
    from tests.test_contrastive_module import TINY

    name = _escaping_name(in_tmp / "escaped")
    ckpt = _clip_ckpt(in_tmp / "crafted.ckpt", name=name, cfg=TINY)
    with pytest.raises(ValueError, match=r"'.*escaped' is not a plain name"):
        run_cli("zeroshot", "-c", _zeroshot_config(in_tmp, data_root), f"--ckpt_path={ckpt}", "--out=zs")
    assert not glob.glob(str(in_tmp / "escaped*")) and not os.path.exists("zs")


def test_export_names_files_only_inside_its_folder(tmp_path):
    from tests.test_contrastive_module import TINY

    name = _escaping_name(tmp_path / "escaped")
    ckpt = _clip_ckpt(tmp_path / "crafted.ckpt", name=name, cfg=TINY)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/export_open_clip.py"), "--ckpt", ckpt,
                          "--out", str(tmp_path / "out"), "--no-register"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode != 0 and "is not a plain name" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    assert not glob.glob(str(tmp_path / "escaped*"))
    # a sane checkpoint exports (the script rebuilds the architecture, not the whole module)
    good = _clip_ckpt(tmp_path / "good.ckpt")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/export_open_clip.py"), "--ckpt", good,
                          "--out", str(tmp_path / "out"), "--no-register"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["mmalign-test-tiny.json", "open_clip_config.json",
                                                    "open_clip_pytorch_model.bin"]
    exported = torch.load(tmp_path / "out" / "open_clip_pytorch_model.bin", weights_only=True)
    trained = torch.load(good, weights_only=True)["state_dict"]
    assert all(torch.equal(v, trained["model." + k]) for k, v in exported.items())


MARKER_MODULE = "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('code ran')\n"


def test_pkg_text_tower_from_a_checkpoint_imports_nothing(tmp_path, data_root):
    """A crafted checkpoint names ``pkg:mmalign_marker_mod``; that module sits in the working directory
    (which ``python -m`` puts on sys.path) and would write IMPORTED if imported."""
    from tests.test_contrastive_module import TINY

    (tmp_path / "mmalign_marker_mod.py").write_text(MARKER_MODULE)
    cfg = {**TINY, "text_cfg": {**TINY["text_cfg"], "hf_model_name": "pkg:mmalign_marker_mod"}}
    ckpt = _clip_ckpt(tmp_path / "crafted.ckpt", cfg=cfg)
    env = {**os.environ, "PYTHONPATH": ROOT, "MMALIGN_DATA": data_root}
    cmd = [sys.executable, "-m", "mmalign", "zeroshot", "-c", _zeroshot_config(tmp_path, data_root),
           f"--ckpt_path={ckpt}", "--out=zs"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode != 0 and "'mmalign_marker_mod' is not a known weight package" in last, res.stderr[-2000:]
    assert "--weight_packages" in last and not (tmp_path / "IMPORTED").exists()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/export_open_clip.py"), "--ckpt", ckpt, "--out",
                          "out", "--no-register"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode != 0 and not (tmp_path / "IMPORTED").exists(), res.stderr[-2000:]
    # the user (not the file) may allow a package on the command line: then, and only then, it is imported
    res = subprocess.run(cmd + ["--weight_packages=[mmalign_marker_mod]"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert (tmp_path / "IMPORTED").exists(), res.stderr[-2000:]


# ---- silent: evaluating random weights is refused unless asked for ----------------------------------

def test_predict_without_checkpoint_refuses_random_weights(in_tmp):
    with pytest.raises(ValueError, match=r"predict.*randomly initialised.*--ckpt_path.*--allow_random_weights=true"):
        run_cli("predict", "-c", DIGITS, "--trainer.limit_predict_batches=1", *QUICK)
    assert not glob.glob("runs/mmalign/version_*")
    p = run_cli("predict", "-c", DIGITS, "--allow_random_weights=true", "--trainer.limit_predict_batches=1", *QUICK)
    assert p.trainer.predict_loop.batch_progress.total.completed == 1


def test_zeroshot_without_checkpoint_or_weights_refuses(in_tmp, data_root):
    config = _zeroshot_config(in_tmp, data_root)
    with pytest.raises(ValueError, match=r"zeroshot.*randomly initialised.*--ckpt_path.*pretrained.*"
                                         r"--allow_random_weights=true"):
        run_cli("zeroshot", "-c", config, "--out=zs")
    assert not os.path.exists("zs")
    run_cli("zeroshot", "-c", config, "--out=zs", "--allow_random_weights=true")
    assert os.path.isfile("zs/zeroshot.json")


def test_zeroshot_out_checked_before_building_anything(in_tmp, data_root):
    from mmalign.training.outputs import OutputLocationError

    (in_tmp / "zs").write_text("a file")
    ckpt = _clip_ckpt(in_tmp / "good.ckpt")
    with pytest.raises(OutputLocationError, match=r"zero-shot results location .*zs is a file.*--out"):
        run_cli("zeroshot", "-c", _zeroshot_config(in_tmp, data_root), f"--ckpt_path={ckpt}", "--out=zs")


# ---- silent: SIGTERM is not a success ---------------------------------------------------------------

def test_sigterm_writes_last_checkpoint_and_exits_non_zero(tmp_path, data_root):
    env = {**os.environ, "MMALIGN_DATA": data_root, "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, "-m", "mmalign", "fit", "-c", DIGITS, *RUN, "--trainer.max_steps=500",
                          "--checkpoint.every_n_train_steps=1000", *QUICK],
                         cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and _steps_run(tmp_path) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    [last] = glob.glob(str(tmp_path / "runs/mmalign/version_0/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] >= 3
    assert "stopped by SIGTERM" in err and "--ckpt_path last" in err


# ---- unclear: configs and checkpoints that cannot be used get one line with the fix ----------------

def test_unset_environment_variable_in_config_is_one_line(in_tmp, capsys):
    (in_tmp / "env.yaml").write_text("trainer:\n  default_root_dir: ${oc.env:MMALIGN_TEST_UNSET_VAR}\n")
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", DIGITS, "-c", "env.yaml", "--trainer.max_steps=1", *QUICK)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("error:") == 1 and len(err.splitlines()) <= 3, err
    line = err.splitlines()[-1]
    assert "MMALIGN_TEST_UNSET_VAR is not set" in line and "env.yaml" in line and "trainer.default_root_dir" in line
    assert "${oc.env:MMALIGN_TEST_UNSET_VAR,<default>}" in line


@pytest.mark.parametrize("bad", [-1, 0])
def test_checkpoint_every_n_train_steps_must_be_positive(in_tmp, capsys, bad):
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", DIGITS, f"--checkpoint.every_n_train_steps={bad}", *QUICK)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"checkpoint.every_n_train_steps must be >= 1 (null: no step checkpoints), got {bad}" in line
    assert not os.path.exists("runs")


@pytest.mark.parametrize("option,value,needle", [("save_top_k", -2, "checkpoint.save_top_k must be >= -1"),
                                                 ("every_n_epochs", 0, "checkpoint.every_n_epochs must be >= 1"),
                                                 ("train_time_interval", "0:00:00", "train_time_interval must be")])
def test_checkpoint_group_refuses_senseless_values(in_tmp, capsys, option, value, needle):
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", DIGITS, f"--checkpoint.{option}={value}", *QUICK)
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]


def _wrong_checkpoints(folder):
    from tests.test_faults import _tiny_classifier_ckpt

    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "garbage.ckpt").write_bytes(b"\x00\x13not a checkpoint at all" * 20)
    good = _tiny_classifier_ckpt(folder / "good.ckpt")
    (folder / "truncated.ckpt").write_bytes(open(good, "rb").read()[:2000])
    net = {"name": "resnet18", "kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}}
    torch.save(ImageClassifier(net, 10, transform={"image_size": 32}).model.state_dict(), str(folder / "plain.pt"))
    _clip_ckpt(folder / "clip.ckpt")


WRONG = [("empty.ckpt", r"is empty \(0 bytes\)"),
         ("garbage.ckpt", r"is not a PyTorch checkpoint"),
         ("truncated.ckpt", r"is truncated or damaged"),
         ("plain.pt", r"holds a plain state dict.*model\.init_args\.network\.checkpoint_path=.*plain\.pt"),
         ("clip.ckpt", r"was trained with model mmalign\.contrastive\.CLIP.*config builds mmalign\.classify")]


@pytest.mark.parametrize("name,pattern", WRONG, ids=[w[0] for w in WRONG])
def test_wrong_checkpoint_gives_one_line_that_fits(in_tmp, name, pattern):
    _wrong_checkpoints(in_tmp)
    with pytest.raises(Exception) as info:
        run_cli("test", "-c", DIGITS, f"--ckpt_path={name}", "--trainer.limit_test_batches=1", *QUICK)
    message = str(info.value)
    assert re.search(pattern, message) and name in message and "\n" not in message, message
    assert "_use_new_zipfile_serialization" not in message and "trust" not in message
    assert not glob.glob("runs/mmalign/version_*")


def _crafted_clip_variants(folder):
    from tests.test_contrastive_module import TINY

    (folder / "mmalign_marker_mod.py").write_text(MARKER_MODULE)
    pkg = {**TINY, "text_cfg": {**TINY["text_cfg"], "hf_model_name": "pkg:mmalign_marker_mod"}}
    # a name no earlier test registered: the teacher reads model_cfg only for an unknown name
    return {"pkg": (_clip_ckpt(folder / "pkg.ckpt", name="mmalign-crafted-pkg", cfg=pkg),
                    "not a known weight package"),
            "path": (_clip_ckpt(folder / "path.ckpt", name=_escaping_name(folder / "escaped"), cfg=TINY),
                     "is not a plain name")}


@pytest.mark.parametrize("variant", ["pkg", "path"])
@pytest.mark.parametrize("entry", ["adapt source", "open_clip teacher"])
def test_other_loaders_of_a_crafted_clip_checkpoint_refuse_it(tmp_path, monkeypatch, data_root, entry, variant):
    """adapt's source and the REPA open_clip teacher rebuild a checkpoint's architecture through the same
    loaders: a crafted name neither writes outside nor imports a module (one on sys.path here)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt, needle = _crafted_clip_variants(tmp_path)[variant]
    with pytest.raises(ValueError, match=needle):
        if entry == "adapt source":
            from mmalign.tta.module import TTAModel

            TTAModel(ckpt, methods=["source"], zeroshot_classes=os.path.join(data_root, "shapes", "classes.json"))
        else:
            from mmalign.encoders import build_teacher

            hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
            build_teacher("open_clip", hp["model"]["name"], ckpt)
    assert not (tmp_path / "IMPORTED").exists() and not glob.glob(str(tmp_path / "escaped*"))
