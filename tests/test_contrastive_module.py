import json
import os

import pytest
import torch

from mmalign.contrastive import CLIP, SigLIP
from mmalign.models.weights import CheckpointMismatchError
from mmalign.models.timm_models import UnknownModelError
from tests._dist import run_distributed

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
OTHER = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": 48}}


def tiny(cls=CLIP, model=None, **groups):
    torch.manual_seed(0)
    return cls(model={"name": "mmalign-test-tiny", "cfg": TINY, **(model or {})}, **groups)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "tokens": torch.randint(1, 400, (n, 12), generator=g)}


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError, match="ViT-B-32"):
        CLIP(model={"name": "ViT-B-3"})


def test_pretrained_path_missing_or_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        tiny(model={"pretrained": str(tmp_path / "nope.pt")})
    other = CLIP(model={"name": "mmalign-test-other", "cfg": OTHER}).model
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch.*visual"):
        tiny(model={"pretrained": str(tmp_path / "other.pt")})


def test_siglip_init_and_clip_defaults():
    s, c = tiny(SigLIP), tiny(CLIP)
    assert s.hparams.objective["loss"] == "siglip" and c.hparams.objective["loss"] == "clip"
    assert torch.allclose(s.model.logit_scale.exp(), torch.tensor(10.0))
    assert float(s.model.logit_bias) == -10.0
    assert torch.allclose(c.model.logit_scale.exp(), torch.tensor(1 / 0.07))


def test_locking_freezes_towers():
    m = tiny(lock={"image": True})
    assert not any(p.requires_grad for p in m.model.visual.parameters())
    assert all(p.requires_grad for n, p in m.model.named_parameters() if n.startswith("transformer"))
    t = tiny(lock={"text": True})
    assert not any(p.requires_grad for n, p in t.model.named_parameters() if n.startswith("transformer"))
    assert all(p.requires_grad for p in t.model.visual.parameters())


def test_batch_of_one_explains_why():
    m = tiny()
    with pytest.raises(ValueError, match="at least 2 image-text pairs.*no negatives"):
        m.training_step(batch(1), 0)


def test_logit_scale_clamped_after_step():
    m = tiny()
    with torch.no_grad():
        m.model.logit_scale.fill_(10.0)  # exp(10) >> 100
    m.on_train_batch_end(None, None, 0)
    assert float(m.model.logit_scale.exp()) == pytest.approx(100.0, rel=1e-5)


def test_export_loads_in_open_clip_with_same_embeddings(tmp_path):
    import open_clip

    m = tiny()
    m.model.eval()
    b = batch(3)
    path = m.export_open_clip(str(tmp_path / "export"))
    again = open_clip.create_model("mmalign-test-tiny", pretrained=path).eval()  # registered in this process
    local = open_clip.create_model(f"local-dir:{tmp_path / 'export'}").eval()
    with torch.no_grad():
        ref = m.model.encode_image(b["image"]), m.model.encode_text(b["tokens"])
        for other in (again, local):
            assert torch.allclose(other.encode_image(b["image"]), ref[0], atol=1e-6)
            assert torch.allclose(other.encode_text(b["tokens"]), ref[1], atol=1e-6)


def test_exported_weights_load_by_name_in_a_fresh_process(tmp_path):
    """``open_clip.create_model(NAME, pretrained=FILE)`` in a new interpreter, with only open_clip."""
    import subprocess
    import sys

    import open_clip

    from mmalign.models.open_clip_models import register_model_config

    name = f"mmalign-test-export-{os.getpid()}"
    register_model_config(name, TINY)
    m = CLIP(model={"name": name, "cfg": TINY}).eval()
    b = batch(3)
    path = m.export_open_clip(str(tmp_path / "export"), register=True)
    installed = os.path.join(os.path.dirname(open_clip.__file__), "model_configs", f"{name}.json")
    try:
        with torch.no_grad():
            torch.save({"image": b["image"], "tokens": b["tokens"], "img": m.model.encode_image(b["image"]),
                        "txt": m.model.encode_text(b["tokens"])}, str(tmp_path / "ref.pt"))
        code = (f"import torch, open_clip\nref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
                f"m = open_clip.create_model({name!r}, pretrained={path!r}).eval()\nwith torch.no_grad():\n"
                "    ok = torch.allclose(m.encode_image(ref['image']), ref['img'], atol=1e-6) and "
                "torch.allclose(m.encode_text(ref['tokens']), ref['txt'], atol=1e-6)\nprint('SAME', ok)")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert "SAME True" in res.stdout, res.stderr[-2000:]
    finally:
        if os.path.isfile(installed):
            os.remove(installed)


class SGDCLIP(CLIP):
    """SGD instead of AdamW: AdamW's first step is ~lr*sign(g) and would hide gradient errors."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class SGDSigLIP(SGDCLIP):
    default_loss = "siglip"


def _fit_one_step(cls_name: str, k: int, batches: list[dict], world: int):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    cls = {"clip": SGDCLIP, "siglip": SGDSigLIP}[cls_name]
    model = tiny(cls, objective={"accumulate_micro_batches": k})
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    rank = trainer.global_rank if world > 1 else 0
    trainer.fit(model, DataLoader([batches[rank]], batch_size=None))
    return {n: p.detach().numpy().copy() for n, p in model.model.named_parameters()}


DDP_CASES = [("clip", 1), ("siglip", 1), ("clip", 2)]


def _ddp_worker(rank, world, cases):
    # Lightning joins the process group tests/_dist.py created (torchelastic-style environment).
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0",
                      TORCHELASTIC_RUN_ID="mmalign-test", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(world))
    full = batch(8)
    parts = [{k2: v[i * 4:(i + 1) * 4] for k2, v in full.items()} for i in range(world)]
    return [_fit_one_step(cls_name, k, parts, world) for cls_name, k in cases]


@pytest.mark.distributed
def test_ddp_step_equals_single_process_global_batch():
    """One real Lightning DDP step on 2 gloo processes equals the single-process step on the global
    batch: CLIP, SigLIP (ring) and CLIP through the feature cache (k=2)."""
    ddp = run_distributed(_ddp_worker, 2, (DDP_CASES,), timeout=300)
    for case, (cls_name, k) in enumerate(DDP_CASES):
        single = _fit_one_step(cls_name, k, [batch(8)], 1)
        for name, ref in single.items():
            for r in range(2):
                assert torch.allclose(torch.from_numpy(ddp[r][case][name]), torch.from_numpy(ref), atol=1e-5), \
                    (cls_name, k, name, r)
        before = {n: p.detach() for n, p in tiny().model.named_parameters()}
        assert any(not torch.allclose(before[n], torch.from_numpy(v)) for n, v in single.items())


def test_feature_cache_step_equals_full_batch_step():
    a, b = _fit_one_step("clip", 1, [batch(8)], 1), _fit_one_step("clip", 4, [batch(8)], 1)
    for name in a:
        assert torch.allclose(torch.from_numpy(a[name]), torch.from_numpy(b[name]), atol=1e-5), name


def test_zeroshot_subcommand_matches_hand_computation(in_tmp, data_root):
    import yaml

    from mmalign import cli
    from mmalign.evaluation import build_zeroshot_weights, load_class_spec

    m = tiny()
    export = m.export_open_clip(str(in_tmp / "export"))
    cfg = {"model": {"class_path": "mmalign.contrastive.CLIP",
                     "init_args": {"model": {"name": "mmalign-test-tiny", "cfg": TINY, "pretrained": export}}},
           "data": {"class_path": "datamodules.ImageLabelDataModule",
                    "init_args": {"shards": {"data_root": data_root, "test": "shapes/heldout"},
                                  "stream": {"num_workers": 0, "batch_size": 32}}},
           "trainer": {"enable_progress_bar": False, "logger": False}}
    (in_tmp / "zs.yaml").write_text(yaml.safe_dump(cfg))
    classes = os.path.join(data_root, "shapes", "classes.json")
    cli.main(["zeroshot", "-c", "zs.yaml", f"--classes={classes}", "--label_field=cls", "--out=zs",
              "--allow_random_weights=true"])
    report = json.loads((in_tmp / "zs" / "zeroshot.json").read_text())
    # the same number computed by hand over the same images
    from datamodules import ImageLabelDataModule

    dm = ImageLabelDataModule(shards={"data_root": data_root, "test": "shapes/heldout"},
                              stream={"num_workers": 0, "batch_size": 64}, preprocess=m.preprocess)
    dm.setup("test")
    spec = load_class_spec(classes)
    tok = m.preprocess.tokenizer
    m.model.eval()
    with torch.no_grad():
        w = build_zeroshot_weights(m.model.encode_text, tok, spec.classnames, spec.templates)
        hits = n = 0
        for b in dm.test_dataloader():
            pred = (m.model.encode_image(b["image"], normalize=True) @ w.T).argmax(-1)
            hits += int((pred == b["label"]).sum())
            n += len(pred)
    assert report["num_classes"] == 36 and report["top1"] == pytest.approx(hits / n)


def test_grad_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        m = tiny(model={"grad_checkpointing": ckpt})
        m.train()
        loss = m.training_step(batch(4), 0)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_zeroshot_on_an_image_folder_uses_its_class_names(in_tmp):
    import numpy as np
    import yaml
    from PIL import Image

    from mmalign import cli

    rng = np.random.default_rng(0)
    for c in ("red_circle", "blue_square", "green_star"):
        (in_tmp / "photos" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(in_tmp / "photos" / c / f"{i}.jpg")
    export = tiny().export_open_clip(str(in_tmp / "export"))
    cfg = {"model": {"class_path": "mmalign.contrastive.CLIP",
                     "init_args": {"model": {"name": "mmalign-test-tiny", "cfg": TINY, "pretrained": export}}},
           "data": {"class_path": "datamodules.ImageLabelDataModule",
                    "init_args": {"shards": {"test": str(in_tmp / "photos")},
                                  "stream": {"num_workers": 0, "batch_size": 4}}},
           "trainer": {"enable_progress_bar": False, "logger": False}}
    (in_tmp / "zs.yaml").write_text(yaml.safe_dump(cfg))
    cli.main(["zeroshot", "-c", "zs.yaml", "--out=zs", "--allow_random_weights=true"])
    report = json.loads((in_tmp / "zs" / "zeroshot.json").read_text())
    assert report["num_classes"] == 3 and report["classes"] == "image folder names"
    assert set(report["per_class_top1"]) == {"red circle", "blue square", "green star"} and 0 <= report["top1"] <= 1


TIMM_TOWER = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "timm_model_name": "resnet10t", "timm_model_pretrained": False,
                                              "timm_pool": "avg", "timm_proj": "linear"},
              "text_cfg": TINY["text_cfg"]}


def timm_tower(path):
    return CLIP(model={"name": "mmalign-test-timm-tower", "cfg": TIMM_TOWER, "image_tower_checkpoint": str(path)})


def test_image_tower_checkpoint_from_timm_weights_or_a_classifier(tmp_path):
    """The quick start's path: a timm state dict (head and all) or an mmalign classifier checkpoint
    becomes the open_clip timm tower's trunk; the head is dropped, every trunk tensor is loaded."""
    import timm

    from mmalign.classify import ImageClassifier

    torch.manual_seed(3)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    clf = ImageClassifier({"name": "resnet10t"}, num_classes=5, transform={"image_size": 32})
    torch.save({"state_dict": clf.state_dict()}, tmp_path / "clf.ckpt")
    for path, ref in ((tmp_path / "timm.pth", source), (tmp_path / "clf.ckpt", clf.model)):
        m = timm_tower(path)
        trunk = m.model.visual.trunk.state_dict()
        want = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
        assert set(trunk) == set(want)
        assert all(torch.equal(trunk[k], want[k]) for k in want)


def test_image_tower_checkpoint_missing_or_of_another_architecture(tmp_path):
    import timm

    with pytest.raises(FileNotFoundError, match="fetch_mobilenet_v2.py"):
        timm_tower(tmp_path / "no.pth")
    torch.save(timm.create_model("mobilenetv2_050", pretrained=False).state_dict(), tmp_path / "mnv2.pth")
    with pytest.raises(CheckpointMismatchError):
        timm_tower(tmp_path / "mnv2.pth")
    # a checkpoint sharing no key with the tower: refused, not left silently random
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="lacks .* tensors of the timm image tower"):
        timm_tower(tmp_path / "other.pth")
