"""Does representation alignment speed up diffusion training? REPA / U-REPA arms on the shapes data.

Arms (same data, steps, seeds and FD network):
  dit_none    DiT, no alignment            dit_repa    DiT + REPA cosine at transformer_blocks.1
  unet_none   UNet2DModel, no alignment    unet_urepa  UNet + U-REPA (cosine + 3 x manifold, mid_block)
  unet_cos    UNet + mid_block cosine only (manifold_weight 0)
Teacher (--teacher): a tiny ViT (configs/repa/teacher_vit_shapes.yaml) or a small dilated ResNet
(configs/repa/teacher_resnet_shapes.yaml), trained here on the 36 shapes classes, or --teacher-ckpt.
FD network: the teacher by default; --fd-ckpt takes the ResNet of configs/classify/shapes.yaml
instead, so FD is not measured in the feature space the aligned arms were pulled towards.
Reports FD at each eval step (mean ± 95% interval over seeds, ``benchstats``), the steps each aligned arm
needs to reach its baseline's final FD (on the seed means and per seed, with the verdict on "at most
half the steps"), Welch's tests of final FD (aligned vs baseline, manifold vs cosine), and the training-step overhead of alignment: optimizer steps (forward, backward, AdamW) of
each aligned arm and its baseline timed interleaved on the same batches in this process, as a ratio.

    python scripts/bench_repa.py --steps 2000 --eval-every 500 --seeds 0 1 2 --fd-samples 1000
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
from benchstats import against, cell, compare, interval, save  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402

TEACHERS = {  # name -> (config that trains it, whether its tokens are interpolated to the student's grid)
    "vit": ("configs/repa/teacher_vit_shapes.yaml", False),  # 8x8 patch tokens at 32 px: the DiT's grid
    # 4x4 map at 32 px (output_stride 8), its tokens upsampled to the student's 8x8 grid
    "resnet": ("configs/repa/teacher_resnet_shapes.yaml", True),
    # torchvision's ImageNet MobileNetV2 (scripts/fetch_mobilenet_v2.py), nothing trained here: dilated to
    # output stride 8 and fed the 32-px images resized to 64 px, its final 1280-d map is the 8x8 grid
    "mobilenetv2": (None, False),
}
MOBILENET = dict(kind="timm", name="mobilenetv2_100",
                 kwargs={"model_kwargs": {"output_stride": 8}, "input_size": 64})
DIT = {"num_layers": 6, "patch_size": 4, "num_attention_heads": 4, "attention_head_dim": 32}
UNET = {"block_out_channels": [32, 64, 64, 128]}
ARMS = {  # name -> (backbone, AlignSpec fields)
    "dit_none": ("dit", dict(mode="none")),
    "dit_repa": ("dit", dict(mode="repa", hook_point="transformer_blocks.1")),  # --dit-hook moves it
    "unet_none": ("unet", dict(mode="none")),
    "unet_urepa": ("unet", dict(mode="urepa", hook_point="mid_block", grid=8, manifold_weight=3.0)),
    "unet_cos": ("unet", dict(mode="urepa", hook_point="mid_block", grid=8, manifold_weight=0.0)),
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

    return ImageLabelDataModule(shards={"data_root": args.data_root, "train": "shapes/train", "val": "shapes/val"},
                                stream={"batch_size": args.batch_size, "num_workers": args.workers, "seed": 0},
                                generate="shapes", label={"key": "cls", "num_classes": 36}, image={"size": 32},
                                preprocess=model.preprocess)


def train_teacher(args) -> str:
    from mmalign import cli

    out = os.path.join(args.work_dir, "teacher")
    c = cli.main(["fit", "-c", os.path.join(ROOT, TEACHERS[args.teacher][0]),
                  f"--trainer.max_epochs={args.teacher_epochs}", f"--trainer.default_root_dir={out}",
                  "--trainer.enable_progress_bar=false", f"--data.init_args.stream.num_workers={args.workers}",
                  f"--data.init_args.shards.data_root={args.data_root}"])
    acc = c.trainer.callback_metrics.get("val/acc")
    print(f"teacher trained: val/acc {float(acc) if acc is not None else float('nan'):.3f}", flush=True)
    return c.trainer.checkpoint_callback.last_model_path


def build_arm(name: str, args, teacher_ckpt: str, fd_samples: int):
    """One arm; teacher and FD network are classifier checkpoints whose architecture the model reads
    from their hyper-parameters. Every arm gets the teacher, so without --fd-ckpt the FD network is
    the teacher's for the unaligned arms too."""
    from mmalign.repa import (AlignSpec, DiffusionSpec, FDSpec, FlowMatchingDiffusion, NetworkSpec, OptimSpec,
                              TeacherSpec)

    backbone, align = ARMS[name]
    if backbone == "dit" and align["mode"] != "none":
        align = {**align, "hook_point": args.dit_hook}
    if align["mode"] != "none":
        align = {**align, **args.align_kwargs}
    kwargs = {**DIT, **args.dit_kwargs} if backbone == "dit" else {**UNET, **args.unet_kwargs}
    fd_net = NetworkSpec(kind="classifier", checkpoint=args.fd_ckpt) if args.fd_ckpt else None
    return FlowMatchingDiffusion(
        diffusion=DiffusionSpec(**{"backbone": backbone, "backbone_kwargs": kwargs, "image_size": 32, "num_classes": 36,
                                   "ema_decay": args.ema_decay, **args.diffusion_kwargs}),
        align=AlignSpec(**{"weight": 0.5, "projector_dim": 512, **align}),
        teacher=TeacherSpec(**(MOBILENET if args.teacher == "mobilenetv2" else dict(kind="classifier")),
                            checkpoint=teacher_ckpt, interpolate_tokens=TEACHERS[args.teacher][1]),
        fd=FDSpec(network=fd_net, num_samples=fd_samples, sample_steps=args.fd_steps),
        optim=OptimSpec(lr=args.lr, warmup_steps=args.warmup_steps, schedule="constant", grad_clip=1.0))


def measure_overhead(args, teacher_ckpt: str, reps: int) -> dict:
    """Median optimizer-step time of every arm, timed round-robin on the same real batches, so load
    changes on a shared machine hit all arms alike; ratios are aligned arm / its baseline."""
    pl.seed_everything(0)
    models = {a: build_arm(a, args, teacher_ckpt, 0) for a in args.arms}
    dm = datamodule(args, next(iter(models.values())))
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(3)]
    opts = {}
    for a, m in models.items():
        m.log = lambda *a_, **k_: None  # no trainer attached
        opts[a] = m.configure_optimizers()["optimizer"]
    times = {a: [] for a in models}
    for r in range(reps + 2):  # the first two rounds warm up allocators and caches
        for a, m in models.items():
            batch = batches[r % len(batches)]
            t0 = time.perf_counter()
            loss = m.training_step(batch, r)
            opts[a].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.trainable_parameters(), m.cfg.optim.grad_clip)
            opts[a].step()
            m.on_train_batch_end(loss, batch, r)  # the EMA update
            if r >= 2:
                times[a].append(time.perf_counter() - t0)
    med = {a: statistics.median(v) for a, v in times.items()}
    ratio = {a: med[a] / med[b] for a, b in BASELINE.items() if a in med and b in med}
    print("step time, interleaved (s): " + ", ".join(f"{a} {v:.4f}" for a, v in med.items()), flush=True)
    return {"step_s": med, "ratio": ratio, "reps": reps, "batch_size": args.batch_size}


def run_arm(name: str, seed: int, args, teacher_ckpt: str) -> dict:
    pl.seed_everything(seed, workers=True)
    model = build_arm(name, args, teacher_ckpt, args.fd_samples)
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


def _reach(points: list[tuple[int, float]], target: float) -> float | None:
    """First step at which an FD curve reaches ``target``, linear in FD between the two evaluations
    around it; None when it never does."""
    for i, (step, fd) in enumerate(points):
        if fd <= target:
            if i == 0:
                return float(step)
            s0, f0 = points[i - 1]
            return s0 + (step - s0) * (f0 - target) / (f0 - fd)
    return None


def summarise(results: list[dict], overhead: dict | None) -> dict:
    """FD curves as mean ± 95% interval over seeds; per aligned arm the speed-up to its baseline's
    final FD (on the seed means, and per seed against the same seed's baseline, with the verdict on
    the REPA claim "at most half the steps", i.e. speed-up >= 2), and Welch's tests of final FD."""
    arms = sorted({r["arm"] for r in results}, key=list(ARMS).index)
    curve, step_s, final = {}, {}, {}
    for a in arms:
        rs = sorted((r for r in results if r["arm"] == a), key=lambda r: r["seed"])
        steps = [s for s, _ in rs[0]["fd"]]
        curve[a] = {s: interval([r["fd"][i][1] for r in rs]) for i, s in enumerate(steps)}
        final[a] = {r["seed"]: r["fd"][-1][1] for r in rs}
        step_s[a] = statistics.median(r["step_s_median"] for r in rs)
    summary = {"fd_curve": {a: {str(s): v for s, v in c.items()} for a, c in curve.items()}, "step_s": step_s,
               "speedup": {}, "overhead": {}, "final_fd_tests": {}}
    by = {(r["arm"], r["seed"]): r for r in results}
    for a, base in BASELINE.items():
        if a not in curve or base not in curve:
            continue
        final_step = max(curve[base])
        target = curve[base][final_step].mean
        reach = _reach(sorted((s, c.mean) for s, c in curve[a].items()), target)
        per_seed = []
        for seed in sorted(final[a]):
            if (base, seed) in by:
                r = _reach([tuple(x) for x in by[(a, seed)]["fd"]], by[(base, seed)]["fd"][-1][1])
                per_seed.append(final_step / r if r else 1.0)  # not reached within the run: no speed-up shown
        summary["speedup"][a] = {"baseline": base, "target_fd": target, "baseline_steps": final_step,
                                 "arm_steps_interpolated": reach, "ratio": final_step / reach if reach else None,
                                 "per_seed_ratio": per_seed, "per_seed_interval": interval(per_seed),
                                 "half_the_steps": against(per_seed, 2.0) if per_seed else None}
        c = compare(list(final[a].values()), list(final[base].values()))
        summary["final_fd_tests"][f"{a} vs {base}"] = {"diff": c.diff, "p": c.p_value, "significant": c.significant,
                                                      "verdict": c.verdict("lower", names=(a, base))}
        # the interleaved measurement when there is one: per-run medians come from different moments
        summary["overhead"][a] = overhead["ratio"][a] if overhead else step_s[a] / step_s[base]
    if "unet_urepa" in final and "unet_cos" in final:
        c = compare(list(final["unet_urepa"].values()), list(final["unet_cos"].values()))
        summary["final_fd_tests"]["unet_urepa vs unet_cos"] = {
            "diff": c.diff, "p": c.p_value, "significant": c.significant,
            "verdict": c.verdict("lower", names=("unet_urepa (manifold)", "unet_cos"))}
    return summary


def print_table(summary: dict) -> None:
    curve = summary["fd_curve"]
    steps = sorted({int(s) for c in curve.values() for s in c})
    print("\nFD (mean ± 95% interval over seeds) at step:")
    print(f"{'arm':<12}" + "".join(f"{s:>16}" for s in steps) + f"{'step s':>10}")
    for a, c in curve.items():
        cells = "".join(f"{c[str(s)].mean:>9.1f} ±{c[str(s)].half_width:<6.1f}" if str(s) in c else f"{'-':>16}"
                        for s in steps)
        print(f"{a:<12}{cells}{summary['step_s'][a]:>10.4f}")
    for a, s in summary["speedup"].items():
        r = f"{s['ratio']:.2f}x" if s["ratio"] else "not reached"
        half = s["half_the_steps"].verdict if s["half_the_steps"] else "n/a"
        print(f"{a}: reaches {s['baseline']}'s final FD {s['target_fd']:.1f} (step {s['baseline_steps']}) at step "
              f"{s['arm_steps_interpolated'] or float('nan'):.0f} -> speed-up {r} on the seed means; per seed "
              f"{cell(s['per_seed_ratio'], 2)}x (<= half the steps: {half}); "
              f"step-time overhead {summary['overhead'][a]:.2f}x")
    for k, v in summary["final_fd_tests"].items():
        print(f"final FD, {k}: {v['diff']:+.1f}, {v['verdict']}")


def merge(paths: list[str], out_path: str) -> None:
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    results = list({(r["arm"], r["seed"]): r for run in runs for r in run["results"]}.values())
    overhead = next((run["overhead"] for run in runs if run.get("overhead")), None)
    summary = summarise(results, overhead)
    print_table(summary)
    save(out_path, {"merged": paths, "fd_network": results[0]["fd_network"],
                    "teacher": next((r["teacher"] for r in results if r["teacher"]), None), "results": results,
                    "overhead": overhead, "summary": summary})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--fd-samples", type=int, default=1000)
    p.add_argument("--fd-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--fd-ckpt", default=None,
                   help="classifier ckpt of configs/classify/shapes.yaml as FD network (default: the teacher)")
    p.add_argument("--dit-kwargs", type=json.loads, default="{}", help='JSON overrides of the DiT size, e.g. \'{"num_layers": 4}\'')
    p.add_argument("--dit-hook", default="transformer_blocks.1", help="DiT module whose output REPA aligns")
    p.add_argument("--unet-kwargs", type=json.loads, default="{}", help="JSON overrides of the UNet size")
    p.add_argument("--align-kwargs", type=json.loads, default="{}",
                   help='JSON AlignSpec overrides of every aligned arm, e.g. \'{"weight": 2.0, "projector_dim": 256}\'')
    p.add_argument("--diffusion-kwargs", type=json.loads, default="{}",
                   help='JSON DiffusionSpec overrides of every arm, e.g. \'{"label_dropout": 1.0}\' (unconditional)')
    p.add_argument("--overhead-reps", type=int, default=20, help="interleaved timing rounds; 0 = skip")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--teacher", default="resnet", choices=list(TEACHERS))
    p.add_argument("--teacher-ckpt", default=None, help="Lightning ckpt of the teacher's config (default: train one); "
                   "for mobilenetv2 the weights file of scripts/fetch_mobilenet_v2.py")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--data-root", default=os.environ.get("MMALIGN_DATA", "data"))
    p.add_argument("--work-dir", default="outputs/bench/repa_work")
    p.add_argument("--out", default="outputs/bench/repa.json")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="summarise the results of earlier runs (final or .partial files, e.g. one seed per "
                        "process) instead of training")
    args = p.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_float32_matmul_precision("high")
    if args.teacher == "mobilenetv2" and not args.teacher_ckpt:
        p.error("--teacher mobilenetv2 needs --teacher-ckpt weights/mobilenetv2_100_imagenet.pth "
                "(python scripts/fetch_mobilenet_v2.py writes it)")
    teacher = args.teacher_ckpt or train_teacher(args)
    overhead = measure_overhead(args, teacher, args.overhead_reps) if args.overhead_reps else None
    results = []
    for s in args.seeds:
        for a in args.arms:
            results.append(run_arm(a, s, args, teacher))
            with open(args.out + ".partial", "w") as f:  # survives a run cut off by a time limit
                json.dump({"teacher_checkpoint": teacher, "overhead": overhead, "results": results}, f)
    summary = summarise(results, overhead)
    print_table(summary)
    out = {"args": vars(args), "teacher_checkpoint": teacher, "fd_network": results[0]["fd_network"],
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "results": results,
           "overhead": overhead, "summary": summary}
    save(args.out, out)


if __name__ == "__main__":
    main()
