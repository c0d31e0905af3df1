"""The peer run of ``bench_contrastive.py --parts peer``: mmalign ``fit`` beside open_clip's own trainer.

Both train the same open_clip model config on the same webdataset shards with the same batch,
**optimizer steps and samples**, seed, learning rate, schedule, weight decay, augmentation, precision,
loader workers and torch threads, each as a whole process timed end to end (start-up, data loading,
training, saving: what a user waits for). Then both final weights are evaluated by the same evaluator
(``mmalign zeroshot`` on the held-out and the seen shapes combinations).

Equal work is enforced, not assumed: open_clip's ``get_wds_dataset`` rounds an epoch *up* (ceil of
samples / batch, then up to a multiple of the loader workers) while ``mmalign fit`` drops the last
partial batch, so open_clip is given ``--train-num-samples`` = mmalign's batches x batch, the
rounding is recomputed here, and after the runs the optimizer step counters of both final checkpoints
and the step counts in both logs are compared: any difference fails the run (``UnequalWorkError``).

A trainer's *fixed cost* (start-up + teardown) and *steady-state step* are separated by a second,
short run of each (``short_steps`` steps): step = (wall_long - wall_short) / (steps_long - steps_short),
fixed = wall_short - steps_short x step, the same arithmetic for both trainers.

open_clip's trainer (``open_clip_train.main``, shipped inside open-clip-torch) needs pandas and
fails on webdataset 1.x (``KeyError: 'fname'``): it runs in a subprocess with ``--deps`` (a folder
holding pandas, pytz, tzdata and webdataset 0.2.86, made by ``pip install --target DIR --no-deps
pandas pytz tzdata webdataset==0.2.86``) first on its path. The model config is registered in
that process with ``open_clip.add_model_config``; nothing is installed or changed.

Arms (``ARMS``): ``fp32`` (both in fp32: the like-for-like row), ``bf16`` (both under bf16 autocast:
mmalign ``trainer.precision=bf16-mixed``, open_clip ``--precision amp_bf16``) and ``defaults`` (each
trainer's own defaults for precision: open_clip_train ``amp``, mmalign the config's).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: precision of each trainer per arm (None: the trainer's own default)
ARMS = {"fp32": ("32-true", "fp32"), "bf16": ("bf16-mixed", "amp_bf16"), "defaults": (None, None)}


class UnequalWorkError(RuntimeError):
    """The two trainers did not take the same number of optimizer steps: the timing compares nothing."""


def _config(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def _run(cmd: list[str], env: dict, cwd: str, log: str) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... failed ({res.returncode}); see {log}:\n" + open(log).read()[-3000:])
    return seconds


def recipe(config: str, data_root: str) -> dict:
    """The settings both trainers share, read from the mmalign config and the shards' ``sizes.json``."""
    cfg = _config(config)
    m = cfg["model"]["init_args"]
    d = cfg["data"]["init_args"]
    stream = d.get("stream") or {}
    sizes = json.load(open(os.path.join(data_root, "shapes", "train", "sizes.json")))
    batch = int(stream.get("batch_size", 64))
    overrides = []
    for key in ("image_tower_checkpoint", "init_checkpoint"):  # relative to where the user runs fit: here, ROOT
        if m["model"].get(key) and not os.path.isabs(m["model"][key]):
            m["model"][key] = os.path.join(ROOT, m["model"][key])
            overrides.append(f"--model.init_args.model.{key}={m['model'][key]}")
    return {"model": m["model"], "lock": m.get("lock") or {}, "optim": m.get("optim") or {}, "batch": batch,
            "n_train": sum(sizes.values()), "mmalign_overrides": overrides,
            "shards": sorted(sizes), "epochs": int(cfg["trainer"]["max_epochs"]),
            "precision": cfg["trainer"].get("precision", "32-true"),
            "steps_per_epoch": sum(sizes.values()) // batch}  # mmalign: drop_last, one rank


def openclip_batches(num_samples: int, batch: int, workers: int) -> int:
    """Batches per epoch open_clip_train's ``get_wds_dataset`` makes of ``num_samples`` (one rank)."""
    per_worker = math.ceil(math.ceil(num_samples / batch) / max(1, workers))
    return per_worker * max(1, workers)


def mmalign_command(config: str, seed: int, workers: int, run_dir: str, epochs: int | None = None,
                    max_steps: int | None = None, precision: str | None = None, extra: tuple = ()) -> list[str]:
    """``mmalign fit`` of the config as shipped, validation and step checkpoints off (open_clip's trainer
    validates nothing here); ``last.ckpt`` is still written, as open_clip writes its final checkpoint."""
    cmd = [sys.executable, "-m", "mmalign", "fit", "-c", config, f"--seed_everything={seed}",
           f"--data.init_args.stream.seed={seed}", f"--data.init_args.stream.num_workers={workers}",
           "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={run_dir}", "--checkpoint.every_n_train_steps=null"]
    if epochs is not None:
        cmd.append(f"--trainer.max_epochs={epochs}")
    if max_steps is not None:
        cmd.append(f"--trainer.max_steps={max_steps}")
    if precision is not None:
        cmd.append(f"--trainer.precision={precision}")
    return cmd + list(extra)


def openclip_command(rec: dict, data_root: str, seed: int, workers: int, run_dir: str, cfg_dir: str,
                     epochs: int, steps_per_epoch: int, precision: str | None = None, extra: tuple = (),
                     model: tuple | None = None) -> list[str]:
    """``open_clip_train.main`` with the recipe of ``rec`` for ``epochs`` epochs of ``steps_per_epoch`` batches.
    ``model``: ``openclip_model(rec, cfg_dir, seed)`` when the caller already made it (built here otherwise)."""
    net, opt = rec["model"], rec["optim"]
    name = net["name"]
    aug = net.get("augment") or {}
    argv = ["--train-data", os.path.join(data_root, "shapes", "train", "{" + ",".join(rec["shards"]) + "}"),
            "--train-num-samples", str(steps_per_epoch * rec["batch"]), "--dataset-type", "webdataset",
            "--batch-size", str(rec["batch"]), "--epochs", str(epochs), "--lr", str(opt.get("lr", 5e-4)),
            "--wd", str(opt.get("weight_decay", 0.2)), "--warmup", str(opt.get("warmup_steps", 0)), "--model", name,
            "--seed", str(seed), "--workers", str(workers), "--device", "cpu", "--logs", run_dir, "--name", "run",
            "--save-frequency", str(epochs), "--zeroshot-frequency", "0", "--log-every-n-steps", "10",
            "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6"]
    if precision is not None:
        argv += ["--precision", precision]
    if "scale" in aug:
        argv += ["--aug-cfg", f"scale=({aug['scale'][0]}, {aug['scale'][1]})"]
    model_cfg, extra_init = model or openclip_model(rec, cfg_dir, seed)
    cfg_path = os.path.join(cfg_dir, f"{name}.json")
    if model_cfg:
        json.dump(model_cfg, open(cfg_path, "w"))
    code = ("import sys, open_clip\n" + (f"open_clip.add_model_config({cfg_path!r})\n" if model_cfg else "")
            + "from open_clip_train.main import main\nmain(sys.argv[1:])\n")
    return [sys.executable, "-c", code, *argv, *extra_init, *extra]


def openclip_model(rec: dict, cfg_dir: str, seed: int) -> tuple[dict | None, list[str]]:
    """The model config open_clip_train registers, and the options that give it mmalign's starting point.

    * ``pkg:NAME`` text towers become the folder the package ships (open_clip reads HF folders as they are);
    * ``image_tower_checkpoint`` / ``init_checkpoint`` (mmalign-only keys): mmalign's model is built from the
      config here, exactly as ``fit`` builds it (ImageNet trunk loaded, pretrained text tower, random
      projections drawn under ``seed``), and its weights are saved as one open_clip checkpoint passed as
      ``--pretrained``; ``pretrained`` (an open_clip tag or file) is passed through;
    * ``lock.text`` -> ``--lock-text --lock-text-unlocked-layers N --lock-text-freeze-layer-norm`` (mmalign's
      lock freezes the tower's LayerNorms too); ``lock.image`` -> ``--lock-image`` with its groups.
    mmalign-only speed options (the locked tower's feature cache, channels-last) have no open_clip_train
    flag: they are what the comparison measures, and the docs say so."""
    net, lock = rec["model"], rec.get("lock") or {}
    model_cfg, extra = net.get("cfg"), []
    if model_cfg:
        from mmalign.models.open_clip_models import resolve_text_paths

        model_cfg = resolve_text_paths(model_cfg)
    if net.get("image_tower_checkpoint") or net.get("init_checkpoint"):
        import torch

        from mmalign.contrastive import CLIP

        torch.manual_seed(seed)
        spec = {k: v for k, v in net.items() if k not in ("channels_last", "compile")}
        model = CLIP(model=spec).model
        path = os.path.join(cfg_dir, "init.pt")
        torch.save({"state_dict": {k: v.contiguous() for k, v in model.state_dict().items()}}, path)
        extra += ["--pretrained", path]
    elif net.get("pretrained"):
        extra += ["--pretrained", str(net["pretrained"])]
    if lock.get("text"):
        extra += ["--lock-text", "--lock-text-unlocked-layers", str(int(lock.get("text_unlocked_layers", 0))),
                  "--lock-text-freeze-layer-norm"]
    if lock.get("image"):
        extra += ["--lock-image", "--lock-image-unlocked-groups", str(int(lock.get("image_unlocked_groups", 0)))]
        if lock.get("image_freeze_bn_stats"):
            extra.append("--lock-image-freeze-bn-stats")
    return model_cfg, extra


def peer_env(data_root: str, threads: int, deps: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "MMALIGN_DATA": data_root}
    if deps:
        env["PYTHONPATH"] = os.pathsep.join([deps, env.get("PYTHONPATH", "")])
    return env


# ---- the step counts each trainer really took -----------------------------------------------------
def _optimizer_steps(optimizer_state: dict) -> int:
    steps = {int(float(s["step"])) for s in optimizer_state["state"].values() if "step" in s}
    if len(steps) != 1:
        raise UnequalWorkError(f"optimizer state holds differing step counters {sorted(steps)}")
    return steps.pop()


def mmalign_steps(run_dir: str) -> dict:
    """Steps of an mmalign run: ``global_step`` and the optimizer's step counter of ``last.ckpt``, and the
    highest step in ``metrics.csv`` (the log)."""
    import csv

    import torch

    [ckpt] = glob.glob(os.path.join(run_dir, "mmalign", "version_*", "checkpoints", "last.ckpt"))
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    [metrics] = glob.glob(os.path.join(run_dir, "mmalign", "version_*", "metrics.csv"))
    with open(metrics) as f:
        logged = [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]
    return {"checkpoint": ckpt, "global_step": int(ck["global_step"]),
            "optimizer_steps": _optimizer_steps(ck["optimizer_states"][0]), "log_last_step": max(logged) if logged else -1}


_OC_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \((\d+)%\)\]")


def openclip_steps(run_dir: str, log: str, epochs: int, batch: int) -> dict:
    """Steps of an open_clip_train run: the optimizer's step counter of its final checkpoint, and the
    batches its log reports per epoch (the last line of each epoch: ``[n/N (100%)]``)."""
    import torch

    [ckpt] = glob.glob(os.path.join(run_dir, "run", "checkpoints", f"epoch_{epochs}.pt"))
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    per_epoch: dict[int, int] = {}
    for line in open(log, errors="replace"):
        m = _OC_LINE.search(line)
        if m:
            per_epoch[int(m.group(1))] = max(per_epoch.get(int(m.group(1)), 0), int(m.group(2)))
    return {"checkpoint": ckpt, "optimizer_steps": _optimizer_steps(ck["optimizer"]),
            "log_steps": sum(n // batch for n in per_epoch.values()), "log_epochs": len(per_epoch)}


def check_equal_work(mm: dict, oc: dict, expected: int) -> None:
    """Every count of both trainers equals ``expected``, or ``UnequalWorkError`` names the ones that differ."""
    counts = {"mmalign global_step": mm["global_step"], "mmalign optimizer steps": mm["optimizer_steps"],
              "open_clip optimizer steps": oc["optimizer_steps"], "open_clip log steps": oc["log_steps"]}
    bad = {k: v for k, v in counts.items() if v != expected}
    if bad:
        raise UnequalWorkError(f"unequal work: expected {expected} optimizer steps on both sides, got {bad} "
                               f"(all counts: {counts}); the timing would compare different amounts of training.")


def _zeroshot(weights_arg: list[str], model_args: list[str], data_root: str, split: str, cwd: str, env: dict) -> float:
    out = os.path.join(cwd, f"zs-{split}-{os.getpid()}-{time.time_ns()}")
    cmd = [sys.executable, "-m", "mmalign", "zeroshot", "-c", os.path.join(ROOT, "configs/clip/zeroshot_shapes.yaml"),
           *model_args, *weights_arg, f"--data.init_args.shards.data_root={data_root}",
           f"--data.init_args.shards.test=shapes/{split}", "--data.init_args.stream.num_workers=0",
           "--trainer.enable_progress_bar=false", f"--out={out}", "--label_field=cls",
           f"--classes={data_root}/shapes/classes.json"]
    _run(cmd, env, cwd, out + ".log")
    return json.load(open(os.path.join(out, "zeroshot.json")))["top1"]


def _pair(rec, config, data_root, deps, seed, workers, env, oc_env, workdir, tag, epochs, steps_per_epoch,
          short, arm, order, cfg_dir, oc_model) -> dict:
    """One mmalign run and one open_clip run of ``epochs`` x ``steps_per_epoch`` steps; wall times and the
    checked step counts. ``short``: both run WHOLE epochs of ``steps_per_epoch`` batches (mmalign through
    ``shards.samples_per_epoch``), so neither pays for stopping its loader workers mid-epoch."""
    mm_prec, oc_prec = ARMS[arm]
    mm_dir, oc_dir = os.path.join(workdir, f"mmalign-{tag}"), os.path.join(workdir, f"openclip-{tag}")
    # a rerun in the same workdir starts clean: open_clip refuses an existing run name, and mmalign
    # would add a version_N beside the old one, leaving two last.ckpt to choose between
    for stale in (mm_dir, oc_dir):
        shutil.rmtree(stale, ignore_errors=True)
    seconds = {}
    cap = (f"--data.init_args.shards.samples_per_epoch={steps_per_epoch * rec['batch']}",) if short else ()
    mm_cmd = mmalign_command(config, seed, workers, mm_dir, epochs=epochs, precision=mm_prec,
                             extra=(*rec["mmalign_overrides"], *cap))
    oc_cmd = openclip_command(rec, data_root, seed, workers, oc_dir, cfg_dir, epochs, steps_per_epoch, oc_prec,
                              model=oc_model)
    for who in order:
        if who == "mmalign":
            seconds[who] = _run(mm_cmd, env, workdir, mm_dir + ".log")
        else:
            seconds[who] = _run(oc_cmd, oc_env, workdir, oc_dir + ".log")
    expected = epochs * steps_per_epoch
    mm, oc = mmalign_steps(mm_dir), openclip_steps(oc_dir, oc_dir + ".log", epochs, rec["batch"])
    check_equal_work(mm, oc, expected)
    return {"steps": expected, "seconds": seconds, "mmalign_counts": mm, "open_clip_counts": oc}


def peer_run(config: str, data_root: str, deps: str, seed: int, workers: int, threads: int, workdir: str,
             epochs: int | None = None, arm: str = "fp32", short_steps: int | None = 2) -> dict:
    """One seed of one arm: mmalign fit and open_clip_train at equal steps; wall times, fixed cost and
    steady-state step of each, and zero-shot of both final models by the same evaluator."""
    rec = recipe(config, data_root)
    epochs = int(epochs or rec["epochs"])
    spe = rec["steps_per_epoch"]
    oc_spe = openclip_batches(spe * rec["batch"], rec["batch"], workers)
    if oc_spe != spe:
        raise UnequalWorkError(f"open_clip_train would make {oc_spe} batches of an epoch of {spe * rec['batch']} "
                               f"samples with {workers} workers (it rounds up to a multiple of the workers) where "
                               f"mmalign makes {spe}: choose --peer-workers dividing {spe}.")
    env, oc_env = peer_env(data_root, threads), peer_env(data_root, threads, deps)
    os.makedirs(workdir, exist_ok=True)
    # alternate which runs first, so a slow drift of the machine's load does not favour one side
    order = ["mmalign", "open_clip"] if seed % 2 == 0 else ["open_clip", "mmalign"]
    with tempfile.TemporaryDirectory() as cfg_dir:
        # open_clip's model config and starting weights: built once for the seed, used by its long and short run
        oc_model = openclip_model(rec, cfg_dir, seed)
        long = _pair(rec, config, data_root, deps, seed, workers, env, oc_env, workdir, f"{arm}-{seed}", epochs, spe,
                     False, arm, order, cfg_dir, oc_model)
        short = None
        if short_steps:
            # both: one whole epoch of n batches (n a multiple of the workers, as open_clip rounds up to one)
            n = max(workers, short_steps - short_steps % max(1, workers))
            short = _pair(rec, config, data_root, deps, seed, workers, env, oc_env, workdir, f"{arm}-{seed}-short", 1,
                          n, True, arm, order[::-1], cfg_dir, oc_model)
    row = {"seed": seed, "arm": arm, "steps": long["steps"], "batch": rec["batch"], "epochs": epochs,
           "workers": workers, "threads": threads, "order": order}
    net = rec["model"]
    model_args = [f"--model.init_args.model.name={net['name']}"] + (
        [f"--model.init_args.model.cfg={json.dumps(net['cfg'])}"] if net.get("cfg") else [])
    weights = {"mmalign": ["--ckpt_path", long["mmalign_counts"]["checkpoint"]],
               "open_clip": [f"--model.init_args.model.pretrained={long['open_clip_counts']['checkpoint']}"]}
    samples = long["steps"] * rec["batch"]
    for who in ("mmalign", "open_clip"):
        s = long["seconds"][who]
        row[who] = {"seconds": s, "samples_per_s": samples / s,
                    **{split: _zeroshot(weights[who], model_args, data_root, split, workdir, env)
                       for split in ("heldout", "val")}}
        if short is not None:
            step = (s - short["seconds"][who]) / (long["steps"] - short["steps"])
            row[who].update(short_seconds=short["seconds"][who], step_s=step,
                            fixed_s=short["seconds"][who] - short["steps"] * step)
    row["time_ratio"] = row["mmalign"]["seconds"] / row["open_clip"]["seconds"]
    row["counts"] = {"long": {k: long[k] for k in ("mmalign_counts", "open_clip_counts")},
                     "short": {k: short[k] for k in ("mmalign_counts", "open_clip_counts")} if short else None}
    return row


def summarise(runs: list[dict], claims=None) -> tuple[str, dict]:
    """The table of one arm's runs; ``claims`` (a ``benchstats.ClaimTable``) receives its claims."""
    from benchstats import cell, compare, interval

    arm = runs[0].get("arm", "fp32")
    ratio = interval([r["time_ratio"] for r in runs])
    lines = [f"peer run [{arm}]: {len(runs)} seed(s), {runs[0]['steps']} steps of batch {runs[0]['batch']} on both "
             f"sides (checked from both checkpoints and logs), {runs[0].get('workers')} workers, "
             f"{runs[0].get('threads')} torch threads",
             f"{'':<12}{'wall s':>14}{'samples/s':>14}{'fixed s':>13}{'step ms':>15}{'held-out top-1':>18}{'seen top-1':>14}"]
    has_fixed = all("fixed_s" in r["mmalign"] for r in runs)
    for who in ("mmalign", "open_clip"):
        fixed = cell([r[who]["fixed_s"] for r in runs]) if has_fixed else "n/a"
        step = cell([1000 * r[who]["step_s"] for r in runs]) if has_fixed else "n/a"
        lines.append(f"{who:<12}{cell([r[who]['seconds'] for r in runs]):>14}"
                     f"{cell([r[who]['samples_per_s'] for r in runs]):>14}  {fixed:>11}  {step:>13}"
                     f"{cell([100 * r[who]['heldout'] for r in runs]):>18}{cell([100 * r[who]['val'] for r in runs]):>14}")
    held = compare([r["mmalign"]["heldout"] for r in runs], [r["open_clip"]["heldout"] for r in runs], paired=True)
    seen = compare([r["mmalign"]["val"] for r in runs], [r["open_clip"]["val"] for r in runs], paired=True)
    lines.append(f"mmalign / open_clip wall time: {ratio.mean:.3f}"
                 + (f" ± {ratio.half_width:.3f}" if not math.isnan(ratio.half_width) else "")
                 + " (per seed " + ", ".join(f"{r['time_ratio']:.3f}" for r in runs) + ")")
    lines.append(f"zero-shot, mmalign vs open_clip (paired by seed): held-out {held.verdict()}, seen {seen.verdict()}")
    if claims is not None:
        claims.target(f"[{arm}] fit wall time <= 0.8x open_clip_train's", [r["time_ratio"] for r in runs], 0.8, "lower")
        if has_fixed:
            claims.better(f"[{arm}] fixed cost: mmalign < open_clip_train", [r["mmalign"]["fixed_s"] for r in runs],
                          [r["open_clip"]["fixed_s"] for r in runs], higher_is_better=False, paired=True)
    return "\n".join(lines), {"time_ratio": ratio, "heldout": held, "seen": seen}
