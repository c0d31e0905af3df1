"""Does representation alignment speed up diffusion training? REPA / U-REPA arms on the shapes data.

Arms (same data, steps, seeds and FD network):
  dit_none    DiT, no alignment            dit_repa    DiT + REPA cosine at transformer_blocks.1
  unet_none   UNet2DModel, no alignment    unet_urepa  UNet + U-REPA (cosine + 3 x manifold, mid_block)
  unet_cos    UNet + mid_block cosine only (manifold_weight 0)
Teacher and FD network: a tiny ViT trained here on the 36 shapes classes (configs/repa/teacher_vit_shapes.yaml),
or --teacher-ckpt. Reports FD at each eval step (mean over seeds), steps for each aligned arm to reach
its baseline's final FD, and the training-step time of each aligned arm over its baseline (overhead ratio).

    python scripts/bench_repa.py --steps 2000 --eval-every 500 --seeds 0 1 --fd-samples 1000 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402

VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}
TEACHER = dict(teacher_kind="timm", teacher_name="vit_tiny_patch16_224",
               teacher_kwargs={"model_kwargs": VIT, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
DIT = {"num_layers": 6, "patch_size": 4, "num_attention_heads": 4, "attention_head_dim": 32}
UNET = {"block_out_channels": [32, 64, 64, 128]}
ARMS = {
    "dit_none": dict(backbone="dit", backbone_kwargs=DIT, align="none"),
    "dit_repa": dict(backbone="dit", backbone_kwargs=DIT, align="repa", hook_point="transformer_blocks.1"),
    "unet_none": dict(backbone="unet", backbone_kwargs=UNET, align="none"),
    "unet_urepa": dict(backbone="unet", backbone_kwargs=UNET, align="urepa", hook_point="mid_block", align_grid=8,
                       manifold_weight=3.0),
    "unet_cos": dict(backbone="unet", backbone_kwargs=UNET, align="urepa", hook_point="mid_block", align_grid=8,
                     manifold_weight=0.0),
}
BASELINE = {"dit_repa": "dit_none", "unet_urepa": "unet_none", "unet_cos": "unet_none"}


class Recorder(pl.Callback):
    """Step wall times (after warm-up) and every val/fd with its global step."""

    def __init__(self, skip: int = 10) -> None:
        self.times, self.fd, self.skip, self._t = [], [], skip, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._t)

    def on_validation_end(self, trainer, pl_module):
        fd = trainer.callback_metrics.get("val/fd")
        if fd is not None and not trainer.sanity_checking:
            self.fd.append((trainer.global_step, float(fd)))


def datamodule(args, model):
    from datamodules import ImageLabelDataModule

    return ImageLabelDataModule(data_root=args.data_root, train_shards="shapes/train", val_shards="shapes/val",
                                generate="shapes", label_key="cls", num_classes=36, batch_size=args.batch_size,
                                num_workers=args.workers, image_size=32, preprocess=model.preprocess, seed=0)


def train_teacher(args) -> str:
    from mmalign import cli

    out = os.path.join(args.work_dir, "teacher")
    c = cli.main(["fit", "-c", os.path.join(ROOT, "configs/repa/teacher_vit_shapes.yaml"),
                  f"--trainer.max_epochs={args.teacher_epochs}", f"--trainer.default_root_dir={out}",
                  "--trainer.enable_progress_bar=false", f"--data.init_args.num_workers={args.workers}",
                  f"--data.init_args.data_root={args.data_root}"])
    acc = c.trainer.callback_metrics.get("val/acc")
    print(f"teacher trained: val/acc {float(acc) if acc is not None else float('nan'):.3f}", flush=True)
    return c.trainer.checkpoint_callback.last_model_path


def run_arm(name: str, seed: int, args, teacher_ckpt: str) -> dict:
    from mmalign.repa import FlowMatchingDiffusion

    pl.seed_everything(seed, workers=True)
    model = FlowMatchingDiffusion(num_classes=36, image_size=32, projector_dim=512, align_lambda=0.5, lr=args.lr,
                                  warmup_steps=100, ema_decay=0.999, fd_num_samples=args.fd_samples,
                                  fd_sample_steps=args.fd_steps, teacher_checkpoint=teacher_ckpt, **TEACHER,
                                  **ARMS[name])
    rec = Recorder(skip=min(10, args.steps // 5))
    trainer = pl.Trainer(max_steps=args.steps, val_check_interval=args.eval_every, check_val_every_n_epoch=None,
                         limit_val_batches=max(1, args.fd_samples // args.batch_size + 1), num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[rec], accelerator=args.accelerator, devices=1)
    t0 = time.time()
    trainer.fit(model, datamodule=datamodule(args, model))
    res = {"arm": name, "seed": seed, "fd": rec.fd, "step_s_median": statistics.median(rec.times),
           "wall_s": time.time() - t0, "fd_network": model.fd_network,
           "teacher": getattr(model, "teacher_description", None), "hook": getattr(model, "hook_name", None),
           "params": sum(p.numel() for p in model.backbone.parameters())}
    print(json.dumps(res), flush=True)
    return res


def summarise(results: list[dict]) -> dict:
    arms = sorted({r["arm"] for r in results}, key=list(ARMS).index)
    curve, step_s = {}, {}
    for a in arms:
        rs = [r for r in results if r["arm"] == a]
        steps = [s for s, _ in rs[0]["fd"]]
        curve[a] = {s: (statistics.mean(r["fd"][i][1] for r in rs), statistics.pstdev(r["fd"][i][1] for r in rs))
                    for i, s in enumerate(steps)}
        step_s[a] = statistics.median(r["step_s_median"] for r in rs)
    summary = {"fd_curve": {a: {str(s): v for s, v in c.items()} for a, c in curve.items()}, "step_s": step_s,
               "speedup": {}, "overhead": {}}
    for a, base in BASELINE.items():
        if a not in curve or base not in curve:
            continue
        final_step = max(curve[base])
        target = curve[base][final_step][0]
        reach = next((s for s in sorted(curve[a]) if curve[a][s][0] <= target), None)
        summary["speedup"][a] = {"baseline": base, "target_fd": target, "baseline_steps": final_step,
                                 "arm_steps": reach, "ratio": final_step / reach if reach else None}
        summary["overhead"][a] = step_s[a] / step_s[base]
    return summary


def print_table(summary: dict) -> None:
    curve = summary["fd_curve"]
    steps = sorted({int(s) for c in curve.values() for s in c})
    print("\nFD (mean ± std over seeds) at step:")
    print(f"{'arm':<12}" + "".join(f"{s:>16}" for s in steps) + f"{'step s':>10}")
    for a, c in curve.items():
        cells = "".join(f"{c[str(s)][0]:>9.3f} ±{c[str(s)][1]:<6.3f}" if str(s) in c else f"{'-':>16}" for s in steps)
        print(f"{a:<12}{cells}{summary['step_s'][a]:>10.4f}")
    for a, s in summary["speedup"].items():
        r = f"{s['ratio']:.2f}x" if s["ratio"] else "not reached"
        print(f"{a}: reaches {s['baseline']}'s final FD {s['target_fd']:.3f} (step {s['baseline_steps']}) at step "
              f"{s['arm_steps']} -> speed-up {r}; step-time overhead {summary['overhead'][a]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--fd-samples", type=int, default=1000)
    p.add_argument("--fd-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--teacher-ckpt", default=None, help="Lightning ckpt of teacher_vit_shapes.yaml; default: train one")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--data-root", default=os.environ.get("MMALIGN_DATA", "data"))
    p.add_argument("--work-dir", default="bench_repa_work")
    p.add_argument("--out", default="bench_repa.json")
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")
    teacher = args.teacher_ckpt or train_teacher(args)
    results = []
    for s in args.seeds:
        for a in args.arms:
            results.append(run_arm(a, s, args, teacher))
            with open(args.out + ".partial", "w") as f:  # survives a run cut off by a time limit
                json.dump({"teacher_checkpoint": teacher, "results": results}, f)
    summary = summarise(results)
    print_table(summary)
    out = {"args": vars(args), "teacher_checkpoint": teacher, "fd_network": results[0]["fd_network"],
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "results": results,
           "summary": summary}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
