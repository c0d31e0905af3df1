"""A/B of the fast paths of docs/performance.md on the peer config's CLIP model (shapes_clip_scratch).

    python scripts/bench_fastpaths.py                           # fp32 vs bf16 vs channels_last vs 1 thread
    python scripts/bench_fastpaths.py --arms fp32 compile --steps 20
    python scripts/bench_fastpaths.py --loader                  # persistent loader workers: epoch start cost

Training steps (forward, CLIP loss, backward, AdamW, clamp) of the config's model on the same
pre-decoded batches and the same initial weights, arms interleaved round by round (A B C A B C ...)
in one process, so a drift of a shared machine's load hits every arm alike. Each round runs
``--steps`` steps per arm after ``--warmup``; the table gives ms/step, the ratio to ``fp32`` per round
with a 95% interval, and the training loss after the same steps from the same start (a quality check
at equal work; zero-shot of a whole bf16 run is the peer benchmark's ``bf16`` arm).

``--loader`` times the first batch of the second epoch of the config's train loader with
``stream.persistent_workers`` off and on (the worker start-up each epoch pays without it).
Rounds are ``REPORT_SEEDS``; prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time

import torch
from benchstats import REPORT_SEEDS, cell, interval, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "clip", "shapes_clip_scratch.yaml")
ARMS = ("fp32", "bf16", "channels_last", "threads1", "compile")


def _built(config: str, data_root: str, batch: int, extra=()):
    from mmalign import cli

    return cli.main(["-c", config, f"--data.init_args.shards.data_root={data_root}",
                     f"--data.init_args.stream.batch_size={batch}", "--data.init_args.stream.num_workers=0",
                     "--trainer.logger=false", *extra], run=False)


def _arm_module(base, arm: str):
    """A copy of the module set up for ``arm``, and the autocast context its steps run in."""
    from mmalign.models import compile_in_place

    m = copy.deepcopy(base)
    ctx = contextlib.nullcontext
    if arm == "bf16":  # Lightning's precision "bf16-mixed" on CPU is this autocast
        ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    if arm == "channels_last":
        m.model.visual.to(memory_format=torch.channels_last)
    if arm == "compile":
        compile_in_place(m.model, True)
    return m, ctx


def _steps(m, ctx, batches, arm: str) -> tuple[float, float]:
    """Seconds per step over ``batches`` and the last loss."""
    opt = m.cfg.optim.build(m.model.named_parameters(), len(batches))
    opt, sched = (opt["optimizer"], opt.get("lr_scheduler", {}).get("scheduler")) if isinstance(opt, dict) else (opt, None)
    threads = torch.get_num_threads()
    if arm == "threads1":
        torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for b in batches:
            img = b["image"].contiguous(memory_format=torch.channels_last) if arm == "channels_last" else b["image"]
            with ctx():
                i, t = m.encode(img, b["tokens"])
                loss = m.contrastive_loss(i.float(), t.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            m._clamp_scale()
        return (time.perf_counter() - t0) / len(batches), float(loss.detach())
    finally:
        torch.set_num_threads(threads)


def model_arms(a) -> dict:
    c = _built(a.config, a.root, a.batch)
    dm, base = c.datamodule, c.model
    dm.setup("fit")
    batches = []
    for b in dm.train_dataloader():
        batches.append({"image": b["image"], "tokens": b["tokens"]})
        if len(batches) == a.warmup + a.steps:
            break
    rows = {arm: [] for arm in a.arms}
    for seed in a.seeds:
        for arm in (a.arms if seed % 2 == 0 else a.arms[::-1]):  # alternate the order round by round
            torch.manual_seed(seed)
            m, ctx = _arm_module(base, arm)
            _steps(m, ctx, batches[: a.warmup], arm)  # warm-up (and compilation) outside the timing
            torch.manual_seed(seed)
            m, _ = _arm_module(base, arm) if arm != "compile" else (m, ctx)
            step_s, loss = _steps(m, ctx, batches[a.warmup:], arm)
            rows[arm].append({"seed": seed, "step_s": step_s, "loss": loss})
            print(f"seed {seed} {arm:<14} {1000 * step_s:8.1f} ms/step  loss {loss:.4f}", flush=True)
    return rows


def loader_arms(a) -> dict:
    rows = {"workers restart each epoch": [], "persistent_workers": []}
    for seed in a.seeds:
        for persistent in ((False, True) if seed % 2 == 0 else (True, False)):
            c = _built(a.config, a.root, a.batch, [f"--data.init_args.stream.num_workers={a.workers}",
                                                   f"--data.init_args.stream.persistent_workers={str(persistent).lower()}",
                                                   f"--data.init_args.stream.seed={seed}"])
            dm = c.datamodule
            dm.setup("fit")
            loader = dm.train_dataloader()
            for _ in loader:  # epoch 0, read through
                pass
            t0 = time.perf_counter()
            next(iter(loader))
            first = time.perf_counter() - t0
            rows["persistent_workers" if persistent else "workers restart each epoch"].append(
                {"seed": seed, "first_batch_s": first})
            print(f"seed {seed} persistent={persistent}: epoch-2 first batch {first:.2f} s", flush=True)
            del loader
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--root", default=os.path.join(ROOT, "data"))
    p.add_argument("--arms", nargs="+", default=["fp32", "bf16", "channels_last", "threads1"], choices=ARMS)
    p.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS), help="rounds (one per seed)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--loader", action="store_true", help="time persistent loader workers instead of the model arms")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="outputs/bench/fastpaths.json")
    a = p.parse_args()
    if "fp32" not in a.arms and not a.loader:
        a.arms = ["fp32", *a.arms]
    result = {"config": a.config, "seeds": a.seeds, "threads": torch.get_num_threads()}
    if a.loader:
        rows = loader_arms(a)
        result["loader"] = rows
        print(f"\nfirst batch of epoch 2, {a.workers} workers, mean ± 95% interval over rounds {a.seeds}")
        for k, v in rows.items():
            print(f"  {k:<28}{cell([r['first_batch_s'] for r in v], 2):>16} s")
    else:
        rows = model_arms(a)
        result["model"] = rows
        print(f"\n{a.steps} steps per arm and round after {a.warmup} warm-up, batch {a.batch}, "
              f"{torch.get_num_threads()} threads; mean ± 95% interval over rounds {a.seeds} (indicative on a shared machine)")
        print(f"  {'arm':<16}{'ms/step':>16}{'ratio to fp32':>18}{'loss at equal steps':>22}")
        for arm, rs in rows.items():
            ratios = [r["step_s"] / f["step_s"] for r, f in zip(rs, rows["fp32"])]
            result.setdefault("ratio", {})[arm] = interval(ratios).__dict__
            print(f"  {arm:<16}{cell([1000 * r['step_s'] for r in rs]):>16}{cell(ratios, 3):>18}"
                  f"{cell([r['loss'] for r in rs], 3):>22}")
    save(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
