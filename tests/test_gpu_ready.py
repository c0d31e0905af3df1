"""GPU-ready paths, tested on CPU: bf16-mixed training, ``compile``, and the FSDP2 sharding plan.

- ``bf16-mixed``: a 2-step fit under CPU autocast, with the activations really in bfloat16;
- ``compile``: CLIP, the classifier (and the DiT, in ``test_repa_module.py``) train compiled with the
  same loss and state-dict keys as uncompiled (``aot_eager`` here: dynamo capture + AOT autograd
  without code generation), plus one real inductor fit (slow: C++ compilation of the kernels);
- FSDP2: ``ContrastiveModule.shard`` (the ``configure_model`` plan) applied with
  ``torch.distributed.fsdp.fully_shard`` on 2 gloo processes; one sharded step equals the unsharded
  step on the global batch.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests._dist import run_distributed
from tests.test_contrastive_module import batch, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs/classify/digits.yaml")
CLIP_CFG = os.path.join(ROOT, "configs/clip/shapes_clip_scratch.yaml")
QUICK = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
         "--trainer.enable_progress_bar=false", "--data.init_args.stream.num_workers=0",
         "--trainer.enable_model_summary=false"]
TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8}


def _dtype_probe(module: torch.nn.Module, kind: type) -> list:
    seen = []
    first = next(m for m in module.modules() if isinstance(m, kind))
    first.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


@pytest.mark.parametrize("config,kind", [(DIGITS, torch.nn.Conv2d), (CLIP_CFG, torch.nn.Conv2d)])
def test_bf16_mixed_fit_runs_in_bfloat16(config, kind, in_tmp):
    from mmalign import cli

    c = cli.main(["-c", config, "--trainer.precision=bf16-mixed", *QUICK, "--trainer.max_steps=1"], run=False)
    seen = _dtype_probe(c.model, kind)
    c.trainer.fit(c.model, c.datamodule)
    assert c.trainer.global_step == 1 and torch.bfloat16 in seen
    losses = [v for k, v in c.trainer.callback_metrics.items() if k.startswith("train/loss")]
    assert losses and all(torch.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in c.model.parameters())  # master weights stay fp32


def _classifier(compile_opt):
    from mmalign.classify import ImageClassifier

    torch.manual_seed(0)
    return ImageClassifier({"name": "resnet18", "kwargs": TINY_RESNET}, 10, {"image_size": 16}, compile=compile_opt)


@pytest.mark.parametrize("which", ["classifier", "clip"])
def test_compiled_step_matches_eager(which):
    if which == "classifier":
        eager, compiled = _classifier(False), _classifier({"backend": "aot_eager"})
        x = torch.randn(4, 3, 16, 16)
        losses = [m(x).logsumexp(-1).mean() for m in (eager, compiled)]
    else:
        eager, compiled = tiny(), tiny(compile={"backend": "aot_eager"})
        b = batch(4)
        losses = [m.contrastive_loss(*m.encode(b["image"], b["tokens"])) for m in (eager, compiled)]
    assert eager.state_dict().keys() == compiled.state_dict().keys()  # checkpoints interchange
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    name, p = next((n, p) for n, p in eager.named_parameters() if p.grad is not None)
    torch.testing.assert_close(dict(compiled.named_parameters())[name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_bad_compile_option_is_named():
    with pytest.raises(ValueError, match="unknown torch.compile argument.*'modee'"):
        _classifier({"modee": "max-autotune"})


@pytest.mark.slow
def test_inductor_compiled_fit(in_tmp):
    """``compile: true`` with inductor, the default backend (C++ kernels built with the system gcc)."""
    from mmalign import cli

    # timm's smallest ResNet, no validation (an eval-mode graph would compile a second time)
    c = cli.main(["fit", "-c", DIGITS, "--model.init_args.compile=true", *QUICK,
                  "--model.init_args.network.name=test_resnet", "--model.init_args.network.kwargs={}",
                  "--trainer.limit_val_batches=0"])
    assert c.trainer.global_step == 2 and torch.isfinite(c.trainer.callback_metrics["train/loss"])


def _sgd_step(model, b, world: int, rank: int):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    img, txt = model.encode(b["image"], b["tokens"])
    loss = model.contrastive_loss(img, txt)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _fsdp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    full = batch(8)
    model = tiny()
    model.shard(init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)))
    sharded = [n for n, p in model.model.named_parameters() if type(p).__name__ == "DTensor"]
    replicated = [n for n, p in model.model.named_parameters() if type(p).__name__ != "DTensor"]
    part = {k: v[rank * 4:(rank + 1) * 4] for k, v in full.items()}
    loss = _sgd_step(model, part, world, rank)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy().copy()
              for n, p in model.model.named_parameters()}
    return {"loss": loss, "params": params, "sharded": len(sharded), "replicated": replicated}


@pytest.mark.distributed
def test_fsdp2_plan_step_equals_unsharded_global_batch():
    out = run_distributed(_fsdp_worker, 2, (), timeout=300)
    ref = tiny()
    _sgd_step(ref, batch(8), 1, 0)
    for r in range(2):
        # every parameter is a DTensor shard but the logit scale, replicated with an averaged gradient
        assert out[r]["replicated"] == ["logit_scale"] and out[r]["sharded"] > 10
        for name, p in ref.model.named_parameters():
            torch.testing.assert_close(torch.from_numpy(out[r]["params"][name]), p.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_gpu_check_script_runs_its_cpu_dry_run(tmp_path):
    """``scripts/gpu_check.sh`` is only useful on a GPU; its dry run keeps it from rotting."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--dry-run", "--out", str(tmp_path / "gc.json")])
    saved = json.loads((tmp_path / "gc.json").read_text())
    assert saved["throughput"]["flops_per_step"] > 0 and out["throughput"]["samples_per_s"] > 0
