"""The grouped options of ContrastiveModule, SpeechTextAligner and ImageClassifier: bad values refused
by name at construction, every old flat option sent to its new place (CLI hint), and checkpoints saved
with the old flat hyper-parameters still loading into the grouped modules."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys

import lightning
import pytest
import torch

from mmalign import cli
from mmalign.classify import ImageClassifier
from mmalign.contrastive import CLIP, ContrastiveModule, SigLIP
from mmalign.speech import SpeechTextAligner
from tests.test_contrastive_module import TINY as CLIP_TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8}
INSTANTIATOR = {"_instantiator": "lightning.pytorch.cli.instantiate_module"}  # what the CLI records
MODULES = (ContrastiveModule, SpeechTextAligner, ImageClassifier)


def _save(path, module, hparams) -> str:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, str(path))
    return str(path)


# ---- the tables ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_every_moved_option_lands_on_a_field_of_its_group(cls):
    params = inspect.signature(cls.__init__).parameters
    assert not set(cls.moved_options) & set(params)  # an old name reused at the top would shadow its hint
    for old, new in cls.moved_options.items():
        group, field = new.split(".")
        spec = type(params[group].default)
        assert dataclasses.is_dataclass(spec) and field in {f.name for f in dataclasses.fields(spec)}, (old, new)
    assert len(params) - 1 <= 10  # a handful of groups, not thirty flat options


# ---- bad values, refused by name before anything is built -------------------------------------------

@pytest.mark.parametrize("cls, kwargs, pattern", [
    (CLIP, {"objective": {"accumulate_micro_batches": 0}}, r"objective.accumulate_micro_batches must be an int >= 1.*got 0"),
    (CLIP, {"objective": {"tile_size": 0}}, r"objective.tile_size must be a positive int .*got 0"),
    (CLIP, {"objective": {"loss": "triplet"}}, r"objective.loss must be one of \['clip', 'siglip'\], got 'triplet'"),
    (CLIP, {"lock": {"text_unlocked_layers": -1}}, r"lock.text_unlocked_layers must be >= 0, got -1"),
    (CLIP, {"model": {"image_size": 0}}, r"model.image_size must be > 0 \(or null\), got 0"),
    (CLIP, {"eval": {"retrieval_chunk_size": 0}}, r"eval.retrieval_chunk_size must be > 0, got 0"),
    (CLIP, {"optim": {"warmup_steps": -5}}, r"optim.warmup_steps must be >= 0, got -5"),
    (SpeechTextAligner, {"towers": {"d_model": 0}}, r"towers.d_model must be > 0, got 0"),
    (SpeechTextAligner, {"towers": {"heads": 3}}, r"towers.d_model \(128\) must be a multiple of towers.heads \(3\)"),
    (SpeechTextAligner, {"towers": {"speech_layers": -1}}, r"towers.speech_layers must be >= 0, got -1"),
    (SpeechTextAligner, {"features": {"n_mels": 0}}, r"features.n_mels must be > 0, got 0"),
    (SpeechTextAligner, {"features": {"spec_augment_kwargs": {"freq_mask": 2}}},
     r"features.spec_augment_kwargs: unknown key\(s\) \['freq_mask'\]"),
    (SpeechTextAligner, {"losses": {"ctc_weight": -1.0}}, r"losses.ctc_weight must be >= 0, got -1.0"),
    (SpeechTextAligner, {"eval": {"onset_tolerance_ms": 0}}, r"eval.onset_tolerance_ms must be > 0, got 0"),
    (ImageClassifier, {"num_classes": 1}, r"num_classes must be an int >= 2, got 1"),
    (ImageClassifier, {"transform": {"image_size": 0}}, r"transform.image_size must be > 0, got 0"),
    (ImageClassifier, {"loss": {"label_smoothing": 1.0}}, r"loss.label_smoothing must be in \[0, 1\), got 1.0"),
    (ImageClassifier, {"network": {"nme": "resnet18"}}, r"network: unknown option\(s\) \['nme'\]; allowed: \["),
])
def test_bad_value_is_refused_by_name(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


def test_a_partial_optim_mapping_keeps_the_modules_own_defaults():
    """Python callers get what a YAML ``optim: {lr: ...}`` gets: the module's optimiser defaults for
    the rest (CLIP: betas (0.9, 0.98), eps 1e-6, weight decay 0.2), not OptimSpec's generic ones."""
    m = CLIP(model={"name": "mmalign-test-tiny", "cfg": CLIP_TINY}, optim={"lr": 1e-2})
    assert (m.cfg.optim.lr, m.cfg.optim.betas, m.cfg.optim.eps, m.cfg.optim.weight_decay) == (1e-2, (0.9, 0.98), 1e-6, 0.2)


# ---- old config keys --------------------------------------------------------------------------------

@pytest.mark.parametrize("config, arg, where", [
    ("clip/shapes_clip.yaml", "--model.init_args.lr=1e-3", "optim.lr"),
    ("clip/shapes_clip.yaml", "--model.init_args.loss=siglip", "objective.loss"),
    ("clip/shapes_clip.yaml", "--model.init_args.lock_text=false", "lock.text"),
    ("clip/shapes_clip.yaml", "--model.init_args.zeroshot_label_field=cls", "eval.label_field"),
    ("speech/spoken_ctc.yaml", "--model.init_args.ctc_weight=0.5", "losses.ctc_weight"),
    ("speech/spoken_ctc.yaml", "--model.init_args.d_model=64", "towers.d_model"),
    ("classify/digits.yaml", "--model.init_args.model_name=resnet34", "network.name"),
    ("classify/digits.yaml", "--model.init_args.image_size=64", "transform.image_size"),
])
def test_old_flat_key_names_its_new_place(in_tmp, capsys, config, arg, where):
    with pytest.raises(SystemExit):
        cli.main(["fit", "-c", os.path.join(ROOT, "configs", config), arg, "--print_config"])
    assert f"moved to '{where}'" in capsys.readouterr().err


def test_old_flat_config_file_fails_before_anything_runs(in_tmp):
    """An old YAML, as a user runs it: one line naming the key's new place, no run folder."""
    (in_tmp / "old.yaml").write_text("model:\n  init_args:\n    warmup_steps: 10\n")
    res = subprocess.run([sys.executable, "-m", "mmalign", "fit", "-c", os.path.join(ROOT, "configs/clip/shapes_clip.yaml"),
                          "-c", "old.yaml", "--print_config"], capture_output=True, text=True, timeout=300,
                         cwd=in_tmp, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode != 0 and "option 'warmup_steps' moved to 'optim.warmup_steps'" in res.stderr, res.stderr[-2000:]
    assert not (in_tmp / "runs").exists()


# ---- old checkpoints --------------------------------------------------------------------------------

def test_old_flat_clip_checkpoint_loads_into_the_grouped_module(tmp_path):
    from mmalign.checkpoint_layout import clip_hparams

    torch.manual_seed(0)
    ref = SigLIP(model={"name": "mmalign-test-tiny", "cfg": CLIP_TINY}, lock={"image": True},
                 objective={"init_logit_bias": -5.0, "tile_size": 2})
    flat = {"model_name": "mmalign-test-tiny", "model_cfg": CLIP_TINY, "pretrained": None, "loss": "siglip",
            "init_logit_bias": -5.0, "loss_tile_size": 2, "lock_image": True, "lr": 1e-3, "weight_decay": 0.1,
            "betas": (0.9, 0.95), "eps": 1e-6, "warmup_steps": 7, "zeroshot_label_field": "cls",
            "accumulate_micro_batches": 1, "_class_path": "mmalign.contrastive.SigLIP", **INSTANTIATOR}
    path = _save(tmp_path / "old.ckpt", ref, flat)
    m = ContrastiveModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    c = m.cfg
    assert (c.model.name, c.objective.loss, c.objective.tile_size, c.objective.init_logit_bias) == \
        ("mmalign-test-tiny", "siglip", 2, -5.0)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.betas, c.optim.warmup_steps) == (1e-3, 0.1, (0.9, 0.95), 7)
    assert c.lock.image and not any(p.requires_grad for p in m.model.visual.parameters())
    assert c.eval.label_field == "cls" and m.hparams.objective["loss"] == "siglip"
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    # the readers outside the module (TTA, teachers) see the old checkpoint in the grouped layout
    old, new = clip_hparams(flat), clip_hparams(dict(ref.hparams))
    assert all(old[g][f] == new[g][f] for g, f in (("model", "name"), ("model", "cfg"), ("objective", "loss")))
    assert clip_hparams({"model_name": "resnet18", "num_classes": 3}) is None  # not a CLIP checkpoint


def test_old_flat_speech_checkpoint_loads_into_the_grouped_module(tmp_path):
    torch.manual_seed(0)
    towers = dict(d_model=32, embed_dim=16, speech_layers=1, text_layers=1, heads=2, dropout=0.0)
    ref = SpeechTextAligner(towers=towers, features={"n_mels": 40, "spec_augment": False},
                            losses={"ctc_weight": 1.0, "consistency_weight": 0.5, "consistency_mode": "dtw"})
    flat = {**towers, "n_mels": 40, "spec_augment": False, "ctc_weight": 1.0, "consistency_weight": 0.5,
            "consistency_mode": "dtw", "lr": 2e-3, "betas": (0.9, 0.9), "warmup_steps": 5, "retrieval_chunk_size": 64}
    path = _save(tmp_path / "old.ckpt", ref, flat)
    m = SpeechTextAligner.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    c = m.cfg
    assert dataclasses.asdict(c.towers) == {**dataclasses.asdict(ref.cfg.towers), **towers}
    assert (c.features.n_mels, c.features.spec_augment, m.frontend.spec_augment) == (40, False, None)
    assert (c.losses.ctc_weight, c.losses.consistency_weight, c.losses.consistency_mode) == (1.0, 0.5, "dtw")
    assert (c.optim.lr, c.optim.betas, c.optim.weight_decay, c.optim.warmup_steps) == (2e-3, (0.9, 0.9), 0.05, 5)
    assert c.eval.retrieval_chunk_size == 64
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())


def test_old_flat_classifier_checkpoint_loads_and_teaches(tmp_path):
    from mmalign.checkpoint_layout import classifier_hparams
    from mmalign.encoders.timm_teacher import classifier_architecture

    torch.manual_seed(0)
    ref = ImageClassifier({"name": "resnet18", "kwargs": RESNET}, num_classes=5,
                          transform={"image_size": 24, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                                     "augment": False},
                          optim={"lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 3}, loss={"label_smoothing": 0.1})
    flat = {"model_name": "resnet18", "num_classes": 5, "pretrained": False, "checkpoint_path": None,
            "model_kwargs": RESNET, "image_size": 24, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
            "augment": False, "lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 3, "label_smoothing": 0.1,
            "compile": False, "_class_path": "mmalign.classify.ImageClassifier", **INSTANTIATOR}
    path = _save(tmp_path / "old.ckpt", ref, flat)
    m = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert m.cfg == ref.cfg and m.num_classes == 5
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    old, new = classifier_hparams(flat), classifier_hparams(dict(ref.hparams))
    assert all(old[k] == new[k] for k in ("network", "num_classes", "transform", "loss"))
    arch = classifier_architecture(path)  # a REPA teacher / FD network given by an old checkpoint
    assert (arch["name"], arch["input_size"], arch["mean"], arch["model_kwargs"]) == ("resnet18", 24, (0.5,) * 3, RESNET)


def test_evaluating_an_old_flat_checkpoint_builds_its_architecture(in_tmp, capsys):
    """``test --ckpt_path OLD`` with today's config: the flat ``model_kwargs`` of the checkpoint is read as
    ``network.kwargs`` and wins over the config's, so its weights load."""
    from tests.test_faults import DIGITS, QUICK

    torch.manual_seed(0)
    ref = ImageClassifier({"name": "resnet18", "kwargs": RESNET}, num_classes=10, transform={"image_size": 32})
    flat = {"model_name": "resnet18", "num_classes": 10, "model_kwargs": RESNET, "image_size": 32, "lr": 3e-3,
            "_class_path": "mmalign.classify.ImageClassifier", **INSTANTIATOR}
    path = _save(in_tmp / "old.ckpt", ref, flat)
    c = cli.main(["test", "-c", DIGITS, f"--ckpt_path={path}", "--trainer.limit_test_batches=1", *QUICK])
    assert "architecture taken from the checkpoint (network.kwargs" in capsys.readouterr().err
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in c.model.state_dict().items())
