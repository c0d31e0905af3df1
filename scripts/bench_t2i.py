"""Does SoftREPA align text and image better than spending the same steps on plain fine-tuning?

Arms, each started from the same trained text-to-image checkpoint (configs/t2i/shapes_t2i.yaml, its EMA
weights) and run for the same number of optimizer steps per seed:
  base       the checkpoint itself (no steps)
  softrepa   SoftREPA (configs/t2i/softrepa.yaml): backbone frozen, soft tokens + timestep offsets train on
             batches of 4 images x 4 captions (16 denoiser passes per step)
  finetune   plain flow-matching fine-tuning of the whole backbone with the base recipe, batch 16 (16
             denoiser passes per step: the same work per step)
Evaluation per arm and seed (the sampling noise is the seed's, shared by the arms, so comparisons are
paired): images generated for the 36 colour x shape prompts (30 seen in training, 6 held out), scored by
the quick start's CLIP (prompt accuracy: the judge's zero-shot class equals the prompt's; colour and shape
separately; CLIP score), and FD between validation images and images generated for their captions, in
the feature space of the same CLIP's image tower. The judge's own accuracy on real images is printed
first (it must be near 1 for the prompt accuracy to mean anything).

Seeds: REPORT_SEEDS (5), fixed up front. Claims (paired over seeds, Holm): SoftREPA beats fine-tuning on
seen and held-out prompt accuracy, CLIP score and FD; SoftREPA beats the base on prompt accuracy.

    python -m mmalign fit -c configs/clip/shapes_clip.yaml                    # the judge (CLIP.ckpt)
    python -m mmalign fit -c configs/t2i/shapes_t2i.yaml                      # the base (BASE.ckpt)
    python scripts/bench_t2i.py --base-ckpt BASE.ckpt --judge-ckpt CLIP.ckpt --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchstats import REPORT_SEEDS, ClaimTable, cell, save  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402

ARMS = ("base", "softrepa", "finetune")
METRICS = ("seen/acc", "heldout/acc", "seen/acc_colour", "seen/acc_shape", "heldout/acc_colour", "heldout/acc_shape",
           "all/clip_score", "fd")


def datamodule(args, model, batch_size: int, seed: int, splits: dict):
    """The one place this bench builds its data; ``splits``: the ``shards`` entries (train / val / extra_val)."""
    from datamodules import ImageTextDataModule

    return ImageTextDataModule(shards={"data_root": args.data_root, **splits}, generate="shapes",
                               stream={"batch_size": batch_size, "num_workers": args.workers, "seed": seed},
                               image={"size": 32}, preprocess=model.preprocess if model is not None else None)


def base_options(path: str) -> dict:
    """The base checkpoint's diffusion, text and optim specs (so every arm matches what was trained)."""
    from mmalign.models.weights import load_checkpoint_file

    hp = load_checkpoint_file(path, mmap=True)["hyper_parameters"]
    return {k: hp[k] for k in ("diffusion", "text", "optim")}


def build(arm: str, args, base: dict):
    from mmalign.t2i import TextToImageDiffusion

    optim = base["optim"]
    softrepa = None
    if arm == "softrepa":
        softrepa = {"n_layers": args.n_layers, "n_tokens": args.n_tokens, "tau": args.tau, "scale": args.scale,
                    "dweight": args.dweight}
        optim = {"lr": args.softrepa_lr, "weight_decay": 1e-4, "warmup_steps": 0, "schedule": "constant",
                 "grad_clip": 0.0}
    elif arm == "finetune":
        optim = {**optim, "warmup_steps": 0}
    m = TextToImageDiffusion(diffusion=base["diffusion"], text=base["text"], softrepa=softrepa, optim=optim,
                             judge={"prompts": os.path.join(args.data_root, "shapes"),
                                    "images_per_prompt": args.images_per_prompt, "sample_steps": args.sample_steps,
                                    "cfg_scale": args.cfg_scale},
                             init_checkpoint=args.base_ckpt)
    return m


class Evaluator:
    """The judge and the FD metric (real statistics added once), shared by every model of the bench."""

    def __init__(self, args) -> None:
        from mmalign.diffusion.fid import add_real, build_fd_metric
        from mmalign.diffusion.specs import NetworkSpec
        from mmalign.t2i.judge import ClipJudge, load_prompt_set

        self.args = args
        self.judge = ClipJudge(args.judge_ckpt)
        self.prompts = load_prompt_set(os.path.join(args.data_root, "shapes"))
        self.fd, self.fd_network = build_fd_metric(NetworkSpec(kind="open_clip", checkpoint=args.judge_ckpt))
        dm = datamodule(args, None, 100, 0, {"val": "shapes/val", "extra_val": {"heldout": "shapes/heldout"}})
        from mmalign.diffusion.transforms import diffusion_transform
        from datamodules.base import Preprocess

        dm.preprocess = Preprocess(eval_transform=diffusion_transform(32))
        dm.setup("validate")
        loaders = dm.val_dataloader()
        self.captions, self.real = [], {}
        for name, loader in zip(("val", "heldout"), loaders):
            imgs, classes = [], []
            for batch in loader:
                imgs.append(batch["image"])
                classes += [int(m["combo_id"]) for m in batch["meta"]]
                if name == "val":
                    self.captions += batch["text"]
            self.real[name] = (torch.cat(imgs), torch.tensor(classes))
        self.captions = self.captions[: args.fd_samples]
        add_real(self.fd, self.real["val"][0], args.fd_samples)

    def judge_real(self) -> dict:
        """The judge on real images (val = seen combinations, heldout), with their own and shuffled prompts."""
        from mmalign.t2i.judge import score_images

        out = {}
        for name, (imgs, classes) in self.real.items():
            got = score_images(self.judge, self.prompts, imgs, classes)
            shuffled = classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(0))]
            bad = score_images(self.judge, self.prompts, imgs, shuffled)
            group = "seen" if name == "val" else "heldout"
            out[name] = {"acc": float(got[f"{group}/acc"]), "acc_shuffled": float(bad["all/acc"]),
                         "clip_score": float(got["all/clip_score"]), "n": len(imgs)}
        return out

    @torch.no_grad()
    def __call__(self, model, seed: int) -> dict:
        from mmalign.diffusion.fid import to_unit

        model.eval()
        model.judge_net = self.judge
        out = {k: float(v) for k, v in model.judge_prompt_set(seed).items()}
        for _, imgs in model.generate_in_batches(self.captions, self.args.sample_steps, self.args.cfg_scale,
                                                 10_000 + seed):
            self.fd.update(to_unit(imgs), real=False)
        out["fd"] = float(self.fd.compute())
        self.fd.reset()  # fakes only: the real statistics stay
        return out


def run(arm: str, seed: int, args, base: dict, evaluate: Evaluator) -> dict:
    pl.seed_everything(seed, workers=True)
    model = build(arm, args, base)
    t0 = time.time()
    if arm != "base":
        batch = 4 if arm == "softrepa" else args.finetune_batch
        trainer = pl.Trainer(max_steps=args.steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator=args.accelerator,
                             devices=1)
        trainer.fit(model, datamodule=datamodule(args, model, batch, seed, {"train": "shapes/train"}))
    train_s = time.time() - t0
    metrics = evaluate(model, seed)
    res = {"arm": arm, "seed": seed, **metrics, "train_s": train_s, "eval_s": time.time() - t0 - train_s,
           "trainable": sum(p.numel() for _, p in model.trainable_named_parameters())}
    print(json.dumps(res), flush=True)
    return res


def summarise(results: list[dict]) -> dict:
    by = {(r["arm"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    table = {a: {m: [by[(a, s)][m] for s in seeds] for m in METRICS} for a in ARMS if (a, seeds[0]) in by}
    claims = ClaimTable()
    if "softrepa" in table and "finetune" in table:
        sr, ft = table["softrepa"], table["finetune"]
        for m, what in (("seen/acc", "prompt accuracy, seen"), ("heldout/acc", "prompt accuracy, held-out"),
                        ("all/clip_score", "CLIP score")):
            claims.better(f"SoftREPA {what} higher than fine-tuning", sr[m], ft[m], paired=True)
        claims.better("SoftREPA FD lower than fine-tuning", sr["fd"], ft["fd"], higher_is_better=False, paired=True)
    if "softrepa" in table and "base" in table:
        for m, what in (("seen/acc", "seen"), ("heldout/acc", "held-out")):
            claims.better(f"SoftREPA prompt accuracy, {what}, higher than the base", table["softrepa"][m],
                          table["base"][m], paired=True)
    return {"seeds": seeds, "table": table, "claims": claims}


def print_summary(summary: dict, judge_real: dict | None, steps: int) -> None:
    if judge_real:
        print("\njudge (the quick start's CLIP) on real images, prompt accuracy with their own / shuffled prompts:")
        for name, r in judge_real.items():
            print(f"  {name:<8} {r['acc']:.3f} / {r['acc_shuffled']:.3f}  (CLIP score {r['clip_score']:.1f}, {r['n']} images)")
    print(f"\nafter {steps} steps, mean ± 95% interval over seeds {summary['seeds']}:")
    heads = {"seen/acc": "acc seen", "heldout/acc": "acc held-out", "seen/acc_colour": "colour seen",
             "seen/acc_shape": "shape seen", "heldout/acc_colour": "colour h-o", "heldout/acc_shape": "shape h-o",
             "all/clip_score": "CLIP score", "fd": "FD"}
    print(f"{'arm':<10}" + "".join(f"{h:>16}" for h in heads.values()))
    for arm, row in summary["table"].items():
        print(f"{arm:<10}" + "".join(f"{cell(row[m], 1 if m in ('fd', 'all/clip_score') else 3):>16}" for m in heads))
    summary["claims"].print("claims (paired over seeds)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-ckpt", required=True, help="a trained configs/t2i/shapes_t2i.yaml checkpoint")
    p.add_argument("--judge-ckpt", required=True, help="the quick start's CLIP checkpoint")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each trained arm")
    p.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-tokens", type=int, default=4)
    p.add_argument("--tau", type=float, default=0.07)
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--dweight", type=float, default=0.0)
    p.add_argument("--softrepa-lr", type=float, default=1e-3)
    p.add_argument("--finetune-batch", type=int, default=16)
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--fd-samples", type=int, default=300)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--data-root", default=os.environ.get("MMALIGN_DATA", "data"))
    p.add_argument("--out", default="outputs/bench/t2i.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    base = base_options(a.base_ckpt)
    evaluate = Evaluator(a)
    judge_real = evaluate.judge_real()
    results = []
    for seed in a.seeds:
        for arm in a.arms:
            results.append(run(arm, seed, a, base, evaluate))
            with open(a.out + ".partial", "w") as f:  # survives a run cut off by a time limit
                json.dump({"judge_real": judge_real, "results": results}, f)
    summary = summarise(results)
    print_summary(summary, judge_real, a.steps)
    save(a.out, {"args": vars(a), "fd_network": evaluate.fd_network, "judge": evaluate.judge.describe(),
                 "judge_real": judge_real, "results": results, "table": summary["table"],
                 "claims": summary["claims"].decide(), "wall_s": time.time() - t0})


if __name__ == "__main__":
    main()
