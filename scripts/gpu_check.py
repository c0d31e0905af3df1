#!/usr/bin/env python
"""The GPU checks that CPU tests cannot do, in one run (``scripts/gpu_check.sh`` wraps it).

Parts, each with its own time limit, each result written as it finishes to ``--out`` (JSON):

- ``ddp``: ``python -m mmalign fit`` of the digits classifier with NCCL DDP on every GPU, bf16-mixed;
- ``fsdp2``: CLIP on shapes through Lightning's ``ModelParallelStrategy`` (the FSDP2 plan of
  ``ContrastiveModule.shard``), bf16-mixed;
- ``throughput``: ViT-B/16 CLIP training steps on synthetic batches, bf16 autocast: samples/s, and
  MFU = measured FLOP/s over the device's peak dense bf16 FLOP/s (FLOPs counted by
  ``torch.utils.flop_counter`` on one step).

``--dry-run`` runs the throughput part on CPU with a tiny model (what the test suite does), so the
script cannot rot unnoticed on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# peak dense bf16 tensor-core FLOP/s by device name fragment (vendor datasheets)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def _save(out: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


def _cli(args: list[str], timeout: int) -> dict:
    t0 = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "mmalign", *args], capture_output=True, text=True, cwd=ROOT,
                             timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        ok, tail = res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        ok, tail = False, f"timed out after {timeout} s: {str(exc.stdout or '')[-1500:]}"
    return {"ok": ok, "seconds": round(time.time() - t0, 1), "log_tail": tail}


def throughput(dry_run: bool, steps: int, batch: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, ROOT)
    from mmalign.contrastive import CLIP

    device = "cpu" if dry_run else "cuda"
    if dry_run:
        cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 2,
                                               "head_width": 32}, "text_cfg": {"context_length": 16, "vocab_size": 49408,
                                                                               "width": 64, "heads": 2, "layers": 2}}
        model, size, ctx = CLIP(model={"name": "gpu-check-tiny", "cfg": cfg}), 32, 16
    else:
        model, size, ctx = CLIP(model={"name": "ViT-B-16"}), 224, 77
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size, device=device)
    tokens = torch.randint(1, 49000, (batch, ctx), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model.contrastive_loss(*model.encode(images, tokens))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"device": name, "model": "ViT-B-16" if not dry_run else "tiny", "batch": batch, "step_s": dt,
            "samples_per_s": batch / dt, "flops_per_step": flops, "achieved_tflops": flops / dt / 1e12,
            "peak_bf16_tflops": peak / 1e12 if peak else None, "mfu": (flops / dt / peak) if peak else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/gpu_check/results.json")
    p.add_argument("--parts", nargs="+", default=["ddp", "fsdp2", "throughput"])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, throughput part only")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    import torch

    results: dict = {"cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count(), "torch": torch.__version__}
    if not args.dry_run and not results["cuda"]:
        results["error"] = "no CUDA device: nothing to check (use --dry-run to exercise the script on CPU)"
        _save(args.out, results)
        print(results["error"])
        return results
    n = max(1, results["gpus"])
    quick = ["--trainer.enable_progress_bar=false", "--trainer.precision=bf16-mixed", "--trainer.accelerator=gpu",
             f"--trainer.devices={n}", "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=2"]
    if "ddp" in args.parts and not args.dry_run:
        results["ddp"] = _cli(["fit", "-c", "configs/classify/digits.yaml", "--trainer.strategy=ddp",
                               "--trainer.max_steps=50", *quick], timeout=150)
        _save(args.out, results)
    if "fsdp2" in args.parts and not args.dry_run:
        strategy = ('--trainer.strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", '
                    f'"init_args": {{"data_parallel_size": {n}, "tensor_parallel_size": 1}}}}')
        results["fsdp2"] = _cli(["fit", "-c", "configs/clip/shapes_clip_scratch.yaml", strategy, "--trainer.max_steps=50",
                                 *quick], timeout=180)
        _save(args.out, results)
    if "throughput" in args.parts:
        results["throughput"] = throughput(args.dry_run, 2 if args.dry_run else args.steps,
                                           4 if args.dry_run else args.batch)
        _save(args.out, results)
    print(json.dumps({k: v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "log_tail"}
                      for k, v in results.items()}, indent=1))
    return results


if __name__ == "__main__":
    main()
