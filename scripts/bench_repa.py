"""Does representation alignment speed up diffusion training, and does it do what REPA says it does?

Arms (same data, steps, seeds and FD network):
  dit_none    DiT, no alignment            dit_repa    DiT + REPA cosine at transformer_blocks.1
  unet_none   UNet2DModel, no alignment    unet_urepa  UNet + U-REPA (cosine + 3 x manifold, mid_block)
  unet_cos    UNet + mid_block cosine only (manifold_weight 0)
Teacher (--teacher): a tiny ViT or a small dilated ResNet trained here on the 36 shapes classes
(configs/repa/teacher_*_shapes.yaml, or --teacher-ckpt), torchvision's ImageNet MobileNetV2, the quick
start's CLIP image tower (--clip-ckpt; its MobileNetV2 trunk dilated to an 8x8 grid at 64 px), or a
randomly initialised MobileNetV2 (a control). --precompute writes the teacher's tokens for the training
set once (image and flip), so the aligned arms do not run the teacher per step.

--score-teachers A B ...: before any run, iREPA's spatial-structure scores (LDS, CDS) of each
candidate's patch tokens on the DiT's 8x8 grid, beside the linear-probe accuracy of its pooled tokens
(global information), on the validation images; pick the teacher with the most spatial structure.

Per run: FD at each evaluation (mean ± 95% interval over seeds, ``benchstats``); at the end, REPA's
mechanism claim: linear-probe accuracy (shape, colour; train -> val split) of the mean-pooled hidden
states at the aligned block (the same block for the unaligned arm), fed the null class, at several
noise levels t, and CKNNA to the teacher's pooled tokens. Each aligned arm: the steps it needs to
reach its own seed's baseline final FD (a seed that never gets there within the run is reported as
"not reached", never imputed), and the claims (final FD lower, probe accuracy and CKNNA higher, paired
over seeds; speed-up >= 2 only when every seed reached the target) under Holm correction.

    python scripts/bench_repa.py --score-teachers clip mobilenetv2 mobilenetv2_random resnet --clip-ckpt CLIP.ckpt
    python scripts/bench_repa.py --teacher clip --clip-ckpt CLIP.ckpt --precompute --arms dit_none dit_repa ...
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchstats import REPORT_SEEDS, ClaimTable, against, interval, save  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402

TEACHERS = {  # name -> (config that trains it, whether its tokens are interpolated to the student's grid)
    "vit": ("configs/repa/teacher_vit_shapes.yaml", False),  # 8x8 patch tokens at 32 px: the DiT's grid
    # 4x4 map at 32 px (output_stride 8), its tokens upsampled to the student's 8x8 grid
    "resnet": ("configs/repa/teacher_resnet_shapes.yaml", True),
    # torchvision's ImageNet MobileNetV2 (mmalign weights fetch mobilenetv2), nothing trained here: dilated to
    # output stride 8 and fed the 32-px images resized to 64 px, its final 1280-d map is the 8x8 grid
    "mobilenetv2": (None, False),
    "mobilenetv2_random": (None, False),  # the same network at random init: a teacher without knowledge
    # the quick start's CLIP image tower (an ImageNet MobileNetV2 fine-tuned on the shapes captions), dilated
    "clip": (None, False),
}
MOBILENET = dict(kind="timm", name="mobilenetv2_100",
                 kwargs={"model_kwargs": {"output_stride": 8}, "input_size": 64})
PROBE_TS = (0.25, 0.5, 0.75)
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
    """Step wall times (after warm-up), every val/fd with its global step, and the alignment terms
    (``train/loss_cos``, ``train/loss_manifold``: minus the mean cosine and the manifold loss) every ``every`` steps,
    so a run shows whether its alignment term moved at all."""

    def __init__(self, skip: int = 10, every: int = 25) -> None:
        self.times, self.fd, self.skip, self._t, self.every = [], [], skip, 0.0, every
        self.align: dict[str, list] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._t)
        if trainer.global_step % self.every == 0 or trainer.global_step == 1:
            for key in ("train/loss_cos", "train/loss_manifold"):
                if (v := trainer.callback_metrics.get(key)) is not None:
                    self.align.setdefault(key.split("/")[1], []).append((trainer.global_step, float(v)))

    def on_validation_end(self, trainer, pl_module):
        fd = trainer.callback_metrics.get("val/fd")
        if fd is not None and not trainer.sanity_checking:
            self.fd.append((trainer.global_step, float(fd)))


def datamodule(args, model=None, shuffle_buffer: int = 1000, drop_last: bool = True):
    """The one place the bench builds its data."""
    from datamodules import ImageLabelDataModule

    return ImageLabelDataModule(shards={"data_root": args.data_root, "train": "shapes/train", "val": "shapes/val"},
                                stream={"batch_size": args.batch_size, "num_workers": args.workers, "seed": 0,
                                        "shuffle_buffer": shuffle_buffer, "drop_last": drop_last},
                                generate="shapes", label={"key": "cls", "num_classes": 36}, image={"size": 32},
                                preprocess=model.preprocess if model is not None else None)


def probe_data(args) -> tuple:
    """``(train, val)`` as ``(images, {"shape": ..., "colour": ...})``: the first ``--probe-train`` training
    images and the whole validation split, in [-1, 1] at 32 px; the class is ``shape * 6 + colour``."""
    from mmalign.diffusion.transforms import diffusion_transform
    from datamodules.base import Preprocess

    t = diffusion_transform(32)
    dm = datamodule(args)
    dm.preprocess = Preprocess(train_transform=t, eval_transform=t)
    dm.setup("fit")
    dm.setup("validate")

    def take(loader, n):
        xs, ys = [], []
        for batch in loader:
            xs.append(batch["image"])
            ys.append(batch["label"])
            if sum(len(x) for x in xs) >= n:
                break
        x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
        return x, {"shape": y // 6, "colour": y % 6}

    return take(dm.train_dataloader(), args.probe_train), take(dm.val_dataloader(), 10 ** 9)


def teacher_spec(name: str, args, ckpt: str | None) -> dict:
    """TeacherSpec fields of a named teacher (``ckpt``: its trained checkpoint, for the trained kinds)."""
    if name == "mobilenetv2":
        return {**MOBILENET, "checkpoint": ckpt or args.mobilenet_ckpt}
    if name == "mobilenetv2_random":
        return {**MOBILENET, "checkpoint": None}
    if name == "clip":
        if not args.clip_ckpt:
            raise SystemExit("teacher 'clip' needs --clip-ckpt (the quick start's CLIP: python -m mmalign fit -c "
                             "configs/clip/shapes_clip.yaml)")
        return {"kind": "open_clip", "checkpoint": args.clip_ckpt, "kwargs": {"trunk_kwargs": {"output_stride": 8}}}
    return {"kind": "classifier", "checkpoint": ckpt, "interpolate_tokens": TEACHERS[name][1]}


def score_teachers(args) -> None:
    """iREPA's spatial structure of each candidate on the DiT's 8x8 grid, with the probe of its pooled tokens."""
    from mmalign.repa.probes import score_teacher
    from mmalign.repa.specs import TeacherSpec

    train, val = probe_data(args)
    rows = {}
    for name in args.score_teachers:
        ckpt = train_teacher(args, name) if TEACHERS[name][0] else None
        spec = TeacherSpec(**teacher_spec(name, args, ckpt))
        torch.manual_seed(0)  # the random-init control is the same network every time
        teacher = spec.build(None if spec.interpolate_tokens else 8, "teacher")
        t0 = time.perf_counter()
        row = score_teacher(teacher, train, val, grid=None)
        if spec.interpolate_tokens:  # its tokens are interpolated to 8x8 during alignment: score those
            from mmalign.evaluation.representation import spatial_structure

            row.update(spatial_structure(torch.cat([teacher.encode(val[0][s: s + 200], grid=8)
                                                    for s in range(0, len(val[0]), 200)])), grid=8)
        rows[name] = {**row, "teacher": teacher.describe(), "seconds": time.perf_counter() - t0}
        print(json.dumps({name: rows[name]}), flush=True)
    print(f"\nteacher candidates on the validation split ({len(val[0])} images), tokens on the 8x8 alignment grid:")
    print(f"{'teacher':<20}{'LDS':>8}{'CDS':>8}{'probe shape':>13}{'probe colour':>14}{'dim':>6}")
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["lds"]):
        print(f"{name:<20}{r['lds']:>8.3f}{r['cds']:>8.3f}{r['probe_shape']:>13.3f}{r['probe_colour']:>14.3f}{r['dim']:>6}")
    # iREPA ranks pretrained encoders; a network that knows nothing (random init) can still have local tokens,
    # so only teachers whose pooled tokens carry the attributes (probe floor) are eligible
    eligible = [n for n, r in rows.items() if min(r["probe_shape"], r["probe_colour"]) >= args.min_probe]
    best = max(eligible, key=lambda n: rows[n]["lds"]) if eligible else None
    print(f"most spatial structure (LDS) among teachers with probe accuracy >= {args.min_probe}: {best}")
    save(args.out, {"args": vars(args), "teachers": rows, "best_by_lds": best})


def precompute(args, name: str, ckpt: str | None) -> str:
    """The teacher's tokens (image and flip) for every training image, on the 8x8 grid, written once."""
    from mmalign.repa.features import write_features
    from mmalign.repa.specs import TeacherSpec

    out = os.path.join(args.work_dir, f"features_{name}")
    if os.path.isfile(os.path.join(out, "meta.json")):
        return out
    spec = TeacherSpec(**teacher_spec(name, args, ckpt))
    teacher = spec.build(None if spec.interpolate_tokens else 8, "teacher")
    from mmalign.diffusion.transforms import diffusion_transform
    from datamodules.base import Preprocess

    dm = datamodule(args, shuffle_buffer=1, drop_last=False)  # every key: the last partial batch too
    dm.preprocess = Preprocess(train_transform=diffusion_transform(32), eval_transform=diffusion_transform(32))
    dm.setup("fit")
    loader = dm.train_dataloader()
    meta = write_features(iter(loader), teacher, out, grid=8, interpolate=spec.interpolate_tokens)
    print(f"precomputed {meta['num_samples']} teacher samples: {meta['teacher']}", flush=True)
    return out


def train_teacher(args, name: str) -> str:
    from mmalign import cli

    out = os.path.join(args.work_dir, f"teacher_{name}")
    done = sorted(glob.glob(os.path.join(out, "mmalign", "version_*", "checkpoints", "last.ckpt")))
    if done:
        return done[-1]
    c = cli.main(["fit", "-c", os.path.join(ROOT, TEACHERS[name][0]),
                  f"--trainer.max_epochs={args.teacher_epochs}", f"--trainer.default_root_dir={out}",
                  "--trainer.enable_progress_bar=false", f"--data.init_args.stream.num_workers={args.workers}",
                  f"--data.init_args.shards.data_root={args.data_root}"])
    acc = c.trainer.callback_metrics.get("val/acc")
    print(f"teacher trained: val/acc {float(acc) if acc is not None else float('nan'):.3f}", flush=True)
    return c.trainer.checkpoint_callback.last_model_path


def build_arm(name: str, args, teacher: dict, fd_samples: int):
    """One arm; ``teacher``: TeacherSpec fields (a network, or precomputed ``features``). Every arm gets the
    teacher, so without --fd-ckpt the FD network is the teacher's for the unaligned arms too."""
    from mmalign.repa import (AlignSpec, DiffusionSpec, FDSpec, FlowMatchingDiffusion, NetworkSpec, OptimSpec,
                              TeacherSpec)

    backbone, align = ARMS[name]
    if backbone == "dit" and align["mode"] != "none":
        align = {**align, "hook_point": args.dit_hook}
    if align["mode"] != "none":
        align = {**align, **args.align_kwargs}
    kwargs = {**DIT, **args.dit_kwargs} if backbone == "dit" else {**UNET, **args.unet_kwargs}
    fd_net = None
    if args.fd_ckpt:
        fd_net = NetworkSpec(kind="classifier", checkpoint=args.fd_ckpt)
    elif args.fd_teacher:  # another candidate's network, e.g. the ImageNet MobileNetV2 when the CLIP tower teaches
        spec = teacher_spec(args.fd_teacher, args, None)
        fd_net = NetworkSpec(spec["kind"], spec.get("checkpoint"), spec.get("name"), spec.get("kwargs", {}))
    return FlowMatchingDiffusion(
        diffusion=DiffusionSpec(**{"backbone": backbone, "backbone_kwargs": kwargs, "image_size": 32, "num_classes": 36,
                                   "ema_decay": args.ema_decay, **args.diffusion_kwargs}),
        align=AlignSpec(**{"weight": 0.5, "projector_dim": 512, **align}),
        teacher=TeacherSpec(**teacher),
        fd=FDSpec(network=fd_net, num_samples=fd_samples, sample_steps=args.fd_steps),
        optim=OptimSpec(lr=args.lr, warmup_steps=args.warmup_steps, schedule="constant", grad_clip=1.0))


def measure_overhead(args, teacher: dict, reps: int) -> dict:
    """Median optimizer-step time of every arm, timed round-robin on the same real batches, so load
    changes on a shared machine hit all arms alike; ratios are aligned arm / its baseline."""
    pl.seed_everything(0)
    models = {a: build_arm(a, args, teacher, 0) for a in args.arms}
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


def run_arm(name: str, seed: int, args, teacher: dict, probes: dict | None) -> dict:
    pl.seed_everything(seed, workers=True)
    model = build_arm(name, args, teacher, args.fd_samples)
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
           "params": sum(p.numel() for p in model.backbone.parameters()), "align_loss": rec.align}
    if probes is not None:
        from mmalign.repa.probes import probe_report

        backbone, _ = ARMS[name]
        hook = model.hook_name or (args.dit_hook if backbone == "dit" else "mid_block")
        bb = model.ema.module  # what is sampled from, and what FD measured
        res["probe_hook"] = hook
        res["probe"] = probe_report(bb, bb.net.get_submodule(hook), bb.null_class, probes["train"], probes["val"],
                                    PROBE_TS, probes["teacher_val"])
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


def speedup(results: list[dict], arm: str, base: str) -> dict:
    """Per seed: the steps ``arm`` needs to reach the same seed's ``base`` final FD, and the ratio; a seed that
    never reaches it within the run is ``None`` ("not reached"), never imputed."""
    by = {(r["arm"], r["seed"]): r for r in results}
    seeds = sorted(s for (a, s) in by if a == arm and (base, s) in by)
    rows = []
    for seed in seeds:
        target = by[(base, seed)]["fd"][-1][1]
        final_step = by[(base, seed)]["fd"][-1][0]
        reach = _reach([tuple(x) for x in by[(arm, seed)]["fd"]], target)
        rows.append({"seed": seed, "target_fd": target, "baseline_steps": final_step, "steps": reach,
                     "ratio": final_step / reach if reach else None})
    return {"per_seed": rows, "reached": sum(r["ratio"] is not None for r in rows), "seeds": len(rows)}


def _probe_means(r: dict) -> dict[str, float]:
    """A run's probe numbers averaged over the noise levels."""
    rows = list(r["probe"].values())
    return {k: sum(row[k] for row in rows) / len(rows) for k in rows[0]}


def summarise(results: list[dict], overhead: dict | None) -> dict:
    """FD curves as mean ± 95% interval over seeds; per aligned arm the per-seed speed-up to its baseline's
    final FD ("not reached" kept as such), the probe and CKNNA tables, and the claims under Holm."""
    arms = sorted({r["arm"] for r in results}, key=list(ARMS).index)
    curve, step_s, final, probe = {}, {}, {}, {}
    for a in arms:
        rs = sorted((r for r in results if r["arm"] == a), key=lambda r: r["seed"])
        steps = [s for s, _ in rs[0]["fd"]]
        curve[a] = {s: interval([r["fd"][i][1] for r in rs]) for i, s in enumerate(steps)}
        final[a] = {r["seed"]: r["fd"][-1][1] for r in rs}
        step_s[a] = statistics.median(r["step_s_median"] for r in rs)
        if all("probe" in r for r in rs):
            probe[a] = {t: {k: interval([r["probe"][t][k] for r in rs]) for k in rs[0]["probe"][t]}
                        for t in rs[0]["probe"]}
    summary = {"fd_curve": {a: {str(s): v for s, v in c.items()} for a, c in curve.items()}, "step_s": step_s,
               "speedup": {}, "overhead": {}, "probe": probe, "claims": []}
    by = {(r["arm"], r["seed"]): r for r in results}
    claims = ClaimTable()
    for a, base in BASELINE.items():
        if a not in curve or base not in curve:
            continue
        seeds = sorted(s for s in final[a] if s in final[base])
        sp = speedup(results, a, base)
        ratios = [r["ratio"] for r in sp["per_seed"]]
        if sp["reached"] == sp["seeds"] and len(ratios) >= 2:
            sp["half_the_steps"] = against(ratios, 2.0)
            sp["interval"] = interval(ratios)
        summary["speedup"][a] = {"baseline": base, **sp}
        claims.better(f"{a}: final FD lower than {base}", [final[a][s] for s in seeds], [final[base][s] for s in seeds],
                      higher_is_better=False, paired=True)
        if a in probe and base in probe:
            pa = {s: _probe_means(by[(a, s)]) for s in seeds}
            pb = {s: _probe_means(by[(base, s)]) for s in seeds}
            for key in pa[seeds[0]]:
                what = "CKNNA to the teacher" if key == "cknna" else f"{key.replace('_', ' ')} accuracy"
                claims.better(f"{a}: {what} (mean over t) higher than {base}", [pa[s][key] for s in seeds],
                              [pb[s][key] for s in seeds], paired=True)
        summary["overhead"][a] = overhead["ratio"][a] if overhead else step_s[a] / step_s[base]
    if "unet_urepa" in final and "unet_cos" in final:
        seeds = sorted(set(final["unet_urepa"]) & set(final["unet_cos"]))
        claims.better("unet_urepa (manifold): final FD lower than unet_cos", [final["unet_urepa"][s] for s in seeds],
                      [final["unet_cos"][s] for s in seeds], higher_is_better=False, paired=True)
    summary["claims"] = claims.decide()
    return summary


def _ratio_cell(r: dict) -> str:
    return "not reached" if r["ratio"] is None else f"{r['ratio']:.2f}x"


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
        per = ", ".join(f"seed {r['seed']}: {_ratio_cell(r)}" for r in s["per_seed"])
        line = f"{a}: steps to its seed's {s['baseline']} final FD -> {per}; reached in {s['reached']} of {s['seeds']} seeds"
        if "interval" in s:
            i = s["interval"]
            line += f"; speed-up {i.mean:.2f} ± {i.half_width:.2f}x (>= 2x, half the steps: {s['half_the_steps'].verdict})"
        else:
            line += "; >= 2x speed-up: not shown (a seed that never reaches the target has a speed-up below 1)"
        print(line + f"; step-time overhead {summary['overhead'][a]:.2f}x")
    if summary["probe"]:
        keys = sorted({k for p in summary["probe"].values() for row in p.values() for k in row})
        print("\nAligned block, mean-pooled hidden states (null class), val split; mean ± 95% interval over seeds:")
        print(f"{'arm':<12}{'t':>6}" + "".join(f"{k:>18}" for k in keys))
        for a, p in summary["probe"].items():
            for t, row in p.items():
                print(f"{a:<12}{t[2:]:>6}" + "".join(f"{row[k].mean:>11.3f} ±{row[k].half_width:<5.3f}" for k in keys))
    rows = summary["claims"]
    if rows:
        print(f"\nclaims (paired over seeds, Holm over {len(rows)} claims)")
        for r in rows:
            p = "n/a" if r["p_holm"] != r["p_holm"] else f"{r['p_holm']:.3g}"
            print(f"  {r['verdict']:<10} {r['claim']}  (diff {r['diff']:+.4g}, Holm p {p})")


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
    p.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--fd-samples", type=int, default=1000)
    p.add_argument("--fd-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--fd-ckpt", default=None,
                   help="classifier ckpt of configs/classify/shapes.yaml as FD network (default: the teacher)")
    p.add_argument("--fd-teacher", default=None, choices=list(TEACHERS),
                   help="a teacher candidate's network as FD network (one that does not teach this run)")
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
                   "for mobilenetv2 the weights file of `mmalign weights fetch mobilenetv2`")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--clip-ckpt", default=None, help="the quick start's CLIP checkpoint (teacher 'clip')")
    p.add_argument("--mobilenet-ckpt", default="weights/mobilenetv2_100_imagenet.pth",
                   help="ImageNet MobileNetV2 weights (python -m mmalign weights fetch mobilenetv2)")
    p.add_argument("--score-teachers", nargs="+", default=None, choices=list(TEACHERS), metavar="TEACHER",
                   help=f"print the spatial-structure score of these candidates ({', '.join(TEACHERS)}) and stop")
    p.add_argument("--min-probe", type=float, default=0.8,
                   help="--score-teachers: a teacher is eligible when its pooled tokens reach this probe accuracy")
    p.add_argument("--precompute", action="store_true", help="precompute the teacher's tokens for the training set")
    p.add_argument("--probe-train", type=int, default=1000, help="training images of the probes; 0 = no probes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the machine is shared)")
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
    torch.set_num_threads(args.threads)
    if args.score_teachers:
        return score_teachers(args)
    ckpt = args.teacher_ckpt or (train_teacher(args, args.teacher) if TEACHERS[args.teacher][0] else None)
    spec = teacher_spec(args.teacher, args, ckpt)
    teacher = {"features": precompute(args, args.teacher, ckpt)} if args.precompute else spec
    probes = None
    if args.probe_train:
        from mmalign.repa.probes import teacher_pooled
        from mmalign.repa.specs import TeacherSpec

        train, val = probe_data(args)
        net = TeacherSpec(**spec)
        net = net.build(None if net.interpolate_tokens else 8, "teacher")
        probes = {"train": train, "val": val, "teacher_val": teacher_pooled(net, val[0])}
        del net
    overhead = measure_overhead(args, teacher, args.overhead_reps) if args.overhead_reps else None
    results = []
    for s in args.seeds:
        for a in args.arms:
            results.append(run_arm(a, s, args, teacher, probes))
            with open(args.out + ".partial", "w") as f:  # survives a run cut off by a time limit
                json.dump({"teacher": spec, "overhead": overhead, "results": results}, f)
    summary = summarise(results, overhead)
    print_table(summary)
    out = {"args": vars(args), "teacher": spec, "fd_network": results[0]["fd_network"],
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "results": results,
           "overhead": overhead, "summary": summary}
    save(args.out, out)


if __name__ == "__main__":
    main()
