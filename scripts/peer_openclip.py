"""The peer run of ``bench_contrastive.py --parts peer``: mmalign ``fit`` beside open_clip's own trainer.

Both train the same open_clip model config on the same webdataset shards with the same batch,
steps, seed, learning rate, schedule, weight decay, augmentation and precision, each as a whole
process timed end to end (start-up, data loading, training, saving: what a user waits for). Then
both final weights are evaluated by the same evaluator (``mmalign zeroshot`` on the held-out and
the seen shapes combinations), so quality is compared on identical terms.

open_clip's trainer (``open_clip_train.main``, shipped inside open-clip-torch) needs pandas and
fails on webdataset 1.x (``KeyError: 'fname'``): it runs in a subprocess with ``--deps`` (a folder
holding pandas, pytz, tzdata and webdataset 0.2.86, made by ``pip install --target DIR --no-deps
pandas pytz tzdata webdataset==0.2.86``) first on its path. The model config is registered in
that process with ``open_clip.add_model_config``; nothing is installed or changed.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _zeroshot(weights_arg: list[str], model_args: list[str], data_root: str, split: str, cwd: str, env: dict) -> float:
    out = os.path.join(cwd, f"zs-{split}-{os.getpid()}-{time.time_ns()}")
    cmd = [sys.executable, "-m", "mmalign", "zeroshot", "-c", os.path.join(ROOT, "configs/clip/zeroshot_shapes.yaml"),
           *model_args, *weights_arg, f"--data.init_args.shards.data_root={data_root}",
           f"--data.init_args.shards.test=shapes/{split}", "--data.init_args.stream.num_workers=0",
           "--trainer.enable_progress_bar=false", f"--out={out}", "--label_field=cls",
           f"--classes={data_root}/shapes/classes.json"]
    _run(cmd, env, cwd, out + ".log")
    return json.load(open(os.path.join(out, "zeroshot.json")))["top1"]


def peer_run(config: str, data_root: str, deps: str, seed: int, workers: int, threads: int, workdir: str,
             epochs: int | None = None) -> dict:
    """One seed: mmalign fit and open_clip_train on the same settings; wall times and zero-shot."""
    cfg = _config(config)
    m = cfg["model"]["init_args"]
    net, opt = m["model"], m.get("optim") or {}
    d = cfg["data"]["init_args"]
    epochs, batch = int(epochs or cfg["trainer"]["max_epochs"]), int(d["batch_size"])
    name, model_cfg = net["name"], net.get("cfg")
    sizes = json.load(open(os.path.join(data_root, "shapes", "train", "sizes.json")))
    n_train, shards = sum(sizes.values()), sorted(sizes)
    steps = epochs * (n_train // batch)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "MMALIGN_DATA": data_root}
    os.makedirs(workdir, exist_ok=True)
    model_args = [f"--model.init_args.model.name={name}"] + (
        [f"--model.init_args.model.cfg={json.dumps(model_cfg)}"] if model_cfg else [])

    # --- mmalign: the config as shipped, validation off (open_clip's trainer validates nothing here)
    mm_dir = os.path.join(workdir, f"mmalign-{seed}")
    mm_cmd = [sys.executable, "-m", "mmalign", "fit", "-c", config, f"--seed_everything={seed}",
              f"--data.init_args.stream.seed={seed}", f"--data.init_args.stream.num_workers={workers}",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", f"--trainer.max_epochs={epochs}",
              f"--trainer.default_root_dir={mm_dir}", "--checkpoint.every_n_train_steps=0"]

    # --- open_clip_train: same model, shards, batch, epochs, lr, wd, warm-up, aug, seed, fp32, CPU
    oc_dir = os.path.join(workdir, f"openclip-{seed}")
    # a rerun in the same workdir starts clean: open_clip refuses an existing run name, and mmalign
    # would add a version_N beside the old one, leaving two last.ckpt to choose between
    for stale in (mm_dir, oc_dir):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = os.path.join(tmp, f"{name}.json")
        if model_cfg:
            json.dump(model_cfg, open(cfg_path, "w"))
        aug = net.get("augment") or {}
        argv = ["--train-data", os.path.join(data_root, "shapes", "train", "{" + ",".join(shards) + "}"),
                "--train-num-samples", str(n_train), "--dataset-type", "webdataset", "--batch-size", str(batch),
                "--epochs", str(epochs), "--lr", str(opt.get("lr", 5e-4)), "--wd", str(opt.get("weight_decay", 0.2)),
                "--warmup", str(opt.get("warmup_steps", 0)), "--model", name, "--seed", str(seed),
                "--workers", str(workers), "--device", "cpu", "--precision", "fp32", "--logs", oc_dir,
                "--name", "run", "--save-frequency", str(epochs), "--zeroshot-frequency", "0",
                "--log-every-n-steps", "10", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6"]
        if "scale" in aug:
            argv += ["--aug-cfg", f"scale=({aug['scale'][0]}, {aug['scale'][1]})"]
        code = ("import sys, open_clip\n"
                + (f"open_clip.add_model_config({cfg_path!r})\n" if model_cfg else "")
                + "from open_clip_train.main import main\nmain(sys.argv[1:])\n")
        oc_env = {**env, "PYTHONPATH": os.pathsep.join([deps, env.get("PYTHONPATH", "")])}
        # alternate which runs first, so a slow drift of the machine's load does not favour one side
        order = ["mmalign", "open_clip"] if seed % 2 == 0 else ["open_clip", "mmalign"]
        seconds = {}
        for who in order:
            if who == "mmalign":
                seconds[who] = _run(mm_cmd, env, workdir, mm_dir + ".log")
            else:
                seconds[who] = _run([sys.executable, "-c", code, *argv], oc_env, workdir, oc_dir + ".log")
    mm_seconds, oc_seconds = seconds["mmalign"], seconds["open_clip"]
    [mm_ckpt] = glob.glob(os.path.join(mm_dir, "mmalign", "version_*", "checkpoints", "last.ckpt"))
    [oc_ckpt] = glob.glob(os.path.join(oc_dir, "run", "checkpoints", f"epoch_{epochs}.pt"))

    scores = {}
    for who, weights in (("mmalign", ["--ckpt_path", mm_ckpt]), ("open_clip", [f"--model.init_args.model.pretrained={oc_ckpt}"])):
        scores[who] = {split: _zeroshot(weights, model_args, data_root, split, workdir, env)
                       for split in ("heldout", "val")}
    samples = steps * batch
    return {"seed": seed, "steps": steps, "batch": batch, "epochs": epochs,
            "mmalign": {"seconds": mm_seconds, "samples_per_s": samples / mm_seconds, **scores["mmalign"]},
            "open_clip": {"seconds": oc_seconds, "samples_per_s": samples / oc_seconds, **scores["open_clip"]},
            "time_ratio": mm_seconds / oc_seconds}


def summarise(runs: list[dict]) -> tuple[str, dict]:
    from benchstats import cell, compare, interval

    ratio = interval([r["time_ratio"] for r in runs])
    lines = [f"peer run: {len(runs)} seed(s), {runs[0]['steps']} steps of batch {runs[0]['batch']}",
             f"{'':<12}{'wall s':>14}{'samples/s':>14}{'held-out top-1':>18}{'seen top-1':>14}"]
    for who in ("mmalign", "open_clip"):
        lines.append(f"{who:<12}{cell([r[who]['seconds'] for r in runs]):>14}"
                     f"{cell([r[who]['samples_per_s'] for r in runs]):>14}"
                     f"{cell([100 * r[who]['heldout'] for r in runs]):>18}{cell([100 * r[who]['val'] for r in runs]):>14}")
    held = compare([r["mmalign"]["heldout"] for r in runs], [r["open_clip"]["heldout"] for r in runs])
    seen = compare([r["mmalign"]["val"] for r in runs], [r["open_clip"]["val"] for r in runs])
    lines.append(f"mmalign / open_clip wall time: {ratio.mean:.3f}"
                 + (f" ± {ratio.half_width:.3f}" if not math.isnan(ratio.half_width) else "") + " (target <= 1.0)")
    lines.append(f"zero-shot, mmalign vs open_clip: held-out {held.verdict()}, seen {seen.verdict()}")
    return "\n".join(lines), {"time_ratio": ratio, "heldout": held, "seen": seen}
