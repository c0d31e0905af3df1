#!/usr/bin/env python
"""The quick start over several seeds: zero-shot top-1 on seen and held-out combinations, wall time.

    python scripts/bench_quickstart.py --seeds 0 1 2 3 4

Each seed is one whole ``python -m mmalign fit -c configs/clip/shapes_clip.yaml --seed_everything=S``
process (what a user runs), timed end to end, into ``--work-dir/seedS``. A seed whose run folder
already holds a finished run (its final validation in ``metrics.csv``) is read back, not re-run,
so runs made elsewhere can be collected by placing them there. The table gives each seed, the
mean ± 95% interval (``benchstats``) and the verdict on the targets (>= 90% seen, >= 60%
held-out): ``holds`` only when the whole interval clears the target.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import time

from benchstats import against, cell, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"val": 0.90, "heldout": 0.60}


def final_metrics(run_dir: str) -> dict | None:
    """Step and zero-shot top-1 of the last validation in the newest ``version_N/metrics.csv``."""
    files = sorted(glob.glob(os.path.join(run_dir, "mmalign", "version_*", "metrics.csv")), key=os.path.getmtime)
    if not files:
        return None
    last = None
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            if row.get("heldout/zeroshot_top1") and row.get("val/zeroshot_top1"):
                last = row
    if last is None:
        return None
    return {"step": int(last["step"]), "epoch": int(last["epoch"]), "val": float(last["val/zeroshot_top1"]),
            "heldout": float(last["heldout/zeroshot_top1"]), "metrics_csv": files[-1]}


def run_seed(config: str, seed: int, run_dir: str, extra: list[str]) -> dict:
    wall_file = os.path.join(run_dir, "wall.json")
    done = final_metrics(run_dir)
    if done is not None:
        wall = json.load(open(wall_file))["seconds"] if os.path.exists(wall_file) else None
        return {"seed": seed, **done, "wall_s": wall, "reused": True}
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "mmalign", "fit", "-c", config, f"--seed_everything={seed}",
           f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(os.path.join(run_dir, "fit.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"seed {seed}: fit exited {rc}; see {run_dir}/fit.log")
    with open(wall_file, "w") as f:
        json.dump({"seconds": seconds}, f)
    done = final_metrics(run_dir)
    if done is None:
        raise RuntimeError(f"seed {seed}: no final validation in {run_dir}; see {run_dir}/fit.log")
    return {"seed": seed, **done, "wall_s": seconds, "reused": False}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs/clip/shapes_clip.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--work-dir", default="outputs/bench/quickstart")
    p.add_argument("--out", default="outputs/bench/quickstart.json")
    p.add_argument("extra", nargs="*", help="more fit arguments after --, e.g. -- --trainer.max_epochs=2")
    a = p.parse_args(argv)
    runs = []
    for seed in a.seeds:
        runs.append(run_seed(os.path.abspath(a.config), seed, os.path.abspath(os.path.join(a.work_dir, f"seed{seed}")),
                             a.extra))
        print(json.dumps(runs[-1]), flush=True)
    verdicts = {split: against([r[split] for r in runs], t) for split, t in TARGETS.items()}
    walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
    print(f"\nquick start ({os.path.relpath(a.config, ROOT)}), zero-shot top-1, 36 classes")
    print(f"{'seed':>6} {'step':>6} {'seen (val)':>11} {'held-out':>9} {'wall s':>8}")
    for r in runs:
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "-"
        print(f"{r['seed']:>6} {r['step']:>6} {100 * r['val']:>10.1f}% {100 * r['heldout']:>8.1f}% {wall:>8}")
    print(f"{'mean':>6} {'':>6} {cell([r['val'] for r in runs], 1, 100):>11} "
          f"{cell([r['heldout'] for r in runs], 1, 100):>9} {cell(walls, 0) if walls else '-':>8}")
    for split, v in verdicts.items():
        print(f"  {split} >= {100 * v.target:.0f}%: {v.verdict} (mean {100 * v.interval.mean:.1f}%, "
              f"95% interval {100 * v.interval.low:.1f}-{100 * v.interval.high:.1f}%)")
    result = {"config": os.path.relpath(a.config, ROOT), "runs": runs, "targets": verdicts}
    save(a.out, result)
    return result


if __name__ == "__main__":
    main()
