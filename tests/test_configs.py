"""Every shipped config, as the user composes it: parsed in the fast tier, run for two steps in the slow one.

Configs compose: a complete base, optionally plus one overlay (``-c base.yaml -c overlay.yaml``).
``CASES`` is the table of compositions with the overrides that make each run in seconds; every
YAML under ``configs/`` must appear in it. One case per method is the smoke fit of the fast tier.
Overrides may name ``{teacher_ckpt}`` / ``{fd_ckpt}``: tiny ``ImageClassifier`` checkpoints written
once per session, standing in for the trained teacher and FD network that REPA configs point at;
``{mobilenet_ckpt}``: randomly initialised timm ``mobilenetv2_100`` weights in place of the quick
start's ImageNet file; ``{t2i_ckpt}``: an untrained text-to-image base for the SoftREPA overlay.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import pytest

from mmalign import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIT_QUICK = ("--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
             "--trainer.enable_progress_bar=false", "--data.init_args.stream.num_workers=0",
             "--trainer.enable_model_summary=false")
RESNET = '{"layers":[1,1,1,1],"channels":[16,32,64,128],"stem_width":16}'
ADAPT_QUICK = ("--model.init_args.source.checkpoint=null", "--model.init_args.source.kind=timm",
               "--model.init_args.source.name=resnet18", f"--model.init_args.source.kwargs={RESNET}",
               "--model.init_args.eata.fisher_samples=64",
               "--data.init_args.benchmark.corruptions=[gaussian_noise,fog]",
               "--data.init_args.adapt.source_max_samples=64", "--data.init_args.stream.num_workers=0",
               "--data.init_args.stream.batch_size=16", "--max_batches=2", "--rounds=2", "--save_adapted=true",
               "--out_dir=adapt_out")
FD_QUICK = ("--model.init_args.fd.num_samples=8", "--model.init_args.fd.sample_steps=2",
            "--model.init_args.fd.network.checkpoint={fd_ckpt}")
TEACHER_QUICK = FD_QUICK + ("--model.init_args.teacher.checkpoint={teacher_ckpt}",)
# the quick start's ImageNet MobileNetV2 file (mmalign weights fetch mobilenetv2) stands in as random weights
MOBILENET_QUICK = ("--model.init_args.model.image_tower_checkpoint={mobilenet_ckpt}",)


@dataclass(frozen=True)
class Case:
    files: tuple[str, ...]  # relative to configs/: a base, optionally an overlay
    command: str = "fit"
    quick: tuple[str, ...] = ()  # extra overrides for a run of seconds
    runs_here: bool = True  # False: needs GPUs; parsed, not run
    smoke: bool = False  # the method's smoke fit in the fast tier


CASES = {
    "classify-digits": Case(("classify/digits.yaml",), smoke=True),
    "classify-shapes": Case(("classify/shapes.yaml",)),
    "clip": Case(("clip/shapes_clip.yaml",), quick=MOBILENET_QUICK, smoke=True),
    "clip-siglip": Case(("clip/shapes_clip.yaml", "clip/siglip.yaml"), quick=MOBILENET_QUICK),
    "clip-scratch": Case(("clip/shapes_clip_scratch.yaml",)),
    "clip-lit": Case(("clip/shapes_clip_scratch.yaml", "clip/lit.yaml")),
    "clip-zeroshot": Case(("clip/zeroshot_shapes.yaml",), "zeroshot",
                          ("--trainer.limit_test_batches=1", "--data.init_args.stream.num_workers=0",
                           "--trainer.enable_progress_bar=false", "--allow_random_weights=true")),
    "clip-vitb32-ddp": Case(("clip/vitb32_laion_ddp.yaml",), runs_here=False),
    "clip-vitb32-fsdp": Case(("clip/vitb32_laion_ddp.yaml", "clip/fsdp.yaml"), runs_here=False),
    "speech-ctc": Case(("speech/spoken_ctc.yaml",), smoke=True),
    "speech-ctc-dtw": Case(("speech/spoken_ctc.yaml", "speech/ctc_dtw.yaml")),
    "speech-joint-softdtw": Case(("speech/spoken_ctc.yaml", "speech/joint_softdtw.yaml")),
    "tta-digits-c": Case(("tta/digits_c.yaml",), "adapt", ADAPT_QUICK + ("--model.init_args.source.num_classes=10",
                                                                       "--data.init_args.benchmark.dir=digits-c-test"),
                         smoke=True),
    "tta-shapes-c": Case(("tta/digits_c.yaml", "tta/shapes_c.yaml"), "adapt",
                         ADAPT_QUICK + ("--model.init_args.source.num_classes=6",
                                        "--data.init_args.benchmark.dir=shapes-c-test")),
    "tta-target": Case(("tta/digits_c.yaml", "tta/target.yaml"), "adapt",
                       ("--model.init_args.source.checkpoint=null", "--model.init_args.source.kind=timm",
                        "--model.init_args.source.name=resnet18", f"--model.init_args.source.kwargs={RESNET}",
                        "--model.init_args.source.num_classes=10",
                        "--data.init_args.shards.test=digits/test", "--data.init_args.stream.num_workers=0",
                        "--data.init_args.stream.batch_size=16", "--max_batches=2", "--out_dir=adapt_out")),
    "repa-dit": Case(("repa/dit_base.yaml",), quick=FD_QUICK, smoke=True),
    "repa-dit-repa": Case(("repa/dit_base.yaml", "repa/repa.yaml"), quick=TEACHER_QUICK),
    "repa-unet": Case(("repa/unet_base.yaml",), quick=FD_QUICK),
    "repa-unet-urepa": Case(("repa/unet_base.yaml", "repa/urepa.yaml"), quick=TEACHER_QUICK),
    "repa-teacher-resnet": Case(("repa/teacher_resnet_shapes.yaml",)),
    "repa-teacher-vit": Case(("repa/teacher_vit_shapes.yaml",)),
    "t2i-mmdit": Case(("t2i/shapes_t2i.yaml",), smoke=True),
    "t2i-unet": Case(("t2i/shapes_t2i.yaml", "t2i/unet.yaml")),
    "t2i-softrepa": Case(("t2i/shapes_t2i.yaml", "t2i/softrepa.yaml"),
                         quick=("--model.init_args.init_checkpoint={t2i_ckpt}",)),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """``{placeholder: path}`` of tiny classifier checkpoints: a dilated ResNet teacher (4x4 map at 32 px,
    as configs/repa/teacher_resnet_shapes.yaml) and a plain ResNet FD network."""
    import lightning
    import torch

    from mmalign.classify import ImageClassifier

    root = tmp_path_factory.mktemp("ckpts")
    tiny = {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 16], "stem_width": 8}
    out = {}
    for key, kwargs in (("{teacher_ckpt}", {**tiny, "output_stride": 8}), ("{fd_ckpt}", tiny)):
        m = ImageClassifier({"name": "resnet18", "kwargs": kwargs}, num_classes=36, transform={"image_size": 32})
        path = str(root / f"{key.strip('{}')}.ckpt")
        torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                    "pytorch-lightning_version": lightning.__version__}, path)
        out[key] = path
    import timm

    out["{mobilenet_ckpt}"] = str(root / "mobilenetv2_100.pth")
    torch.save(timm.create_model("mobilenetv2_100", pretrained=False).state_dict(), out["{mobilenet_ckpt}"])
    out["{t2i_ckpt}"] = _t2i_base(root)
    return out


def _t2i_base(root) -> str:
    """An untrained checkpoint of configs/t2i/shapes_t2i.yaml's backbone: the base softrepa.yaml needs."""
    import torch
    import yaml

    from mmalign.t2i import TextToImageDiffusion

    with open(os.path.join(ROOT, "configs", "t2i", "shapes_t2i.yaml")) as f:
        diffusion = yaml.safe_load(f)["model"]["init_args"]["diffusion"]
    m = TextToImageDiffusion(diffusion=diffusion)
    path = str(root / "t2i_base.ckpt")
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    return path


def _args(case: Case, checkpoints: dict[str, str]) -> list[str]:
    files = [a for f in case.files for a in ("-c", os.path.join(ROOT, "configs", f))]
    quick = list(case.quick)
    for key, path in checkpoints.items():
        quick = [q.replace(key, path) for q in quick]
    return [case.command, *files, *quick, *(FIT_QUICK if case.command == "fit" else ())]


def test_every_shipped_config_is_in_the_table():
    shipped = {os.path.relpath(p, os.path.join(ROOT, "configs"))
               for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)}
    covered = {f for case in CASES.values() for f in case.files}
    assert shipped == covered, f"not in CASES: {sorted(shipped - covered)}; missing files: {sorted(covered - shipped)}"
    assert all(len(c.files) <= 2 for c in CASES.values())  # a base and at most one overlay


@pytest.mark.parametrize("name", list(CASES))
def test_config_parses(name, in_tmp, capsys):
    case = CASES[name]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([case.command, *[a for f in case.files for a in ("-c", os.path.join(ROOT, "configs", f))],
                  "--print_config"])
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None) and "class_path:" in out and "${" not in out


def _run(case: Case, checkpoints: dict[str, str], monkeypatch):
    import lightning.pytorch as pl
    import torch

    before: dict = {}
    real_fit = pl.Trainer.fit

    def fit(self, model, *args, **kwargs):  # observes the model the CLI hands over; the fit itself is real
        before.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return real_fit(self, model, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    c = cli.main(_args(case, checkpoints))
    if case.command == "fit":
        assert c.trainer.global_step == 2
        # the two steps trained something: a finite loss, and trainable weights that moved
        loss = c.trainer.callback_metrics.get("train/loss")
        assert loss is not None and torch.isfinite(loss), loss
        moved = [n for n, p in c.model.named_parameters()
                 if n in before and not torch.equal(p.detach().cpu(), before[n].cpu())]
        assert before and moved, f"no trainable parameter changed in 2 steps (of {len(before)})"


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.smoke])
def test_smoke_run_per_method(name, in_tmp, checkpoints, monkeypatch):
    _run(CASES[name], checkpoints, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.runs_here and not c.smoke])
def test_every_config_runs_two_steps(name, in_tmp, checkpoints, monkeypatch):
    _run(CASES[name], checkpoints, monkeypatch)
