"""Where the time of ``python -m mmalign fit`` goes: fixed cost by phase and per-step cost by part.

    python scripts/profile_fit.py                         # configs/clip/shapes_clip_scratch.yaml, 40 steps
    python scripts/profile_fit.py --steps 60 --workers 0  # decode inside the training process (visible)
    python scripts/profile_fit.py --cprofile              # also a cProfile of the steps (top functions)
    python scripts/profile_fit.py -- --trainer.precision=bf16-mixed   # any CLI option after --
    python scripts/profile_fit.py --code /path/to/main-checkout --out before.json   # another tree's code

The script re-runs itself as a child process (so the interpreter's start and exit are measured from
outside) that stamps every phase of one ``fit``:

- ``interpreter``: process launch to the child's first line; ``exit``: its last line to process end;
- ``import <pkg>``: the imports ``fit`` needs, in the order they happen (each row is what that import
  adds to the ones above it);
- ``parse + build``: the CLI parsing the config and building model, datamodule, trainer, loggers;
- ``fit set-up``: ``trainer.fit`` up to the first batch (datamodule set-up, shard indexing, optimizer);
- ``first step``: the first whole step (loader workers starting, first decode);
- ``steps``: every later whole step, each timed from its batch start to the next batch start (logging
  steps included, nothing dropped); ``teardown``: after the last step to ``fit``'s return.

Inside the steps, selected functions are wrapped with a wall-clock counter (calls and seconds per step,
each excluding the other probes it calls):
the NaN guard, the module's ``log`` calls, the logger connector's flushes, the loggers, the progress
bar, the checkpoint callback, the data-health bookkeeping, the wait for the next batch (with
``--workers 0`` this includes the stream's decode), forward (``training_step``), backward, optimizer
and scheduler step. ``other`` is the rest of the step (Lightning's loop and hook dispatch).

Prints a table (phase -> seconds) and writes JSON (``--out``). The machine may be shared: compare
runs made back to back, and treat single figures as indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "clip", "shapes_clip_scratch.yaml")
#: the imports fit needs, in the order fit makes them
IMPORTS = ("torch", "torchvision", "lightning.pytorch", "mmalign.cli", "open_clip")
#: (row name, "module:Class.attr" or "module:function") wrapped with a counter during the run
PROBES = (
    ("nan guard", "mmalign.training.callbacks:NaNGuard.on_before_backward"),
    ("data health", "mmalign.training.callbacks:DataHealthMonitor.on_train_epoch_end"),
    ("self.log", "lightning.pytorch.core.module:LightningModule.log"),
    ("log flush (connector)", "lightning.pytorch.trainer.connectors.logger_connector.logger_connector:"
                              "_LoggerConnector.update_train_step_metrics"),
    ("progress bar", "lightning.pytorch.callbacks.progress.rich_progress:RichProgressBar.on_train_batch_end"),
    ("checkpoint callback", "mmalign.training.checkpointing:RunCheckpoint.on_train_batch_end"),
    ("next batch (data wait)", "torch.utils.data.dataloader:_BaseDataLoaderIter.__next__"),
    ("forward + loss", "mmalign.contrastive.module:ContrastiveModule.training_step"),
    ("backward", "lightning.pytorch.strategies.strategy:Strategy.backward"),
    ("optimizer step", "torch.optim.adamw:AdamW.step"),
    ("scheduler step", "torch.optim.lr_scheduler:LRScheduler.step"),
)
#: set-up work timed on its own (inside the fixed-cost phases)
SETUP_PROBES = (
    ("shard indexing", "datamodules.base:index_shard"),
    ("model build", "mmalign.models.open_clip_models:create_open_clip"),
    ("checkpoint write", "mmalign.training.checkpointing:AtomicCheckpointIO.save_checkpoint"),
)


class Counter:
    def __init__(self):
        self.calls, self.seconds, self.active = 0, 0.0, 0


#: time spent in nested probes of each active probe: a probe's seconds exclude the probes it calls
#: (Lightning runs forward and backward inside the optimizer's step closure)
_NESTED: list[float] = []


def wrap(target: str, counter: Counter) -> bool:
    """Replace ``module:Owner.attr`` (or ``module:function``) by a counting wrapper; False if absent."""
    import functools
    import importlib

    module_name, _, path = target.partition(":")
    try:
        owner = importlib.import_module(module_name)
    except ImportError:
        return False
    *parents, attr = path.split(".")
    for p in parents:
        owner = getattr(owner, p, None)
    fn = getattr(owner, attr, None) if owner is not None else None
    if fn is None:
        return False

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        if counter.active:  # re-entry (a subclass calling super): count the outer call only
            return fn(*args, **kwargs)
        counter.active += 1
        _NESTED.append(0.0)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - t0
            counter.seconds += elapsed - _NESTED.pop()
            counter.calls += 1
            counter.active -= 1
            if _NESTED:
                _NESTED[-1] += elapsed

    setattr(owner, attr, counted)
    return True


def _exit_stamp(label: str) -> None:
    print(f"PROFILE_EXIT {label} {time.time()!r}", flush=True)


def child(a) -> dict:
    """One fit in this process, every phase stamped."""
    import atexit

    t_start = time.time()
    atexit.register(_exit_stamp, "atexit_end")  # registered first, runs last: after every other handler
    stamps = {}
    for name in IMPORTS:
        t0 = time.perf_counter()
        __import__(name)
        stamps[f"import {name}"] = time.perf_counter() - t0
    import lightning.pytorch as pl

    from mmalign import cli

    probes = {name: Counter() for name, _ in PROBES + SETUP_PROBES}
    found = {name: wrap(target, probes[name]) for name, target in PROBES + SETUP_PROBES}
    clock: dict[str, list] = {"batch_start": []}

    class Clock(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            clock["fit_start"] = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock["batch_start"].append(time.perf_counter())
            if len(clock["batch_start"]) == 2:  # counters cover the steps after the first
                for c in probes.values():
                    c.steady_from = (c.calls, c.seconds)

        def on_train_end(self, trainer, pl_module):
            clock["train_end"] = time.perf_counter()

    out_dir = os.path.abspath(a.run_dir)
    args = ["fit", "-c", a.config, f"--trainer.max_steps={a.steps}", "--trainer.max_epochs=-1",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=true", f"--trainer.default_root_dir={out_dir}",
            "--checkpoint.every_n_train_steps=null"]
    if a.workers is not None:
        args.append(f"--data.init_args.stream.num_workers={a.workers}")
    args += a.extra
    t0 = time.perf_counter()
    c = cli.main(args[1:], run=False)
    stamps["parse + build"] = time.perf_counter() - t0
    c.trainer.callbacks.insert(0, Clock())
    profiler = None
    if a.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t_fit = time.perf_counter()
    c.trainer.fit(c.model, datamodule=c.datamodule)
    t_done = time.perf_counter()
    if profiler is not None:
        profiler.disable()
    b = clock["batch_start"]
    steps = len(b)
    stamps["fit set-up"] = b[0] - t_fit
    stamps["first step"] = b[1] - b[0]
    stamps["steps"] = clock["train_end"] - b[1]
    stamps["teardown"] = t_done - clock["train_end"]
    per_step = {}
    for name, _ in PROBES:
        cnt = probes[name]
        calls0, secs0 = getattr(cnt, "steady_from", (0, 0.0))
        per_step[name] = {"found": found[name], "calls": cnt.calls - calls0, "s_per_step": (cnt.seconds - secs0) / (steps - 1)}
    setup = {name: {"found": found[name], "calls": probes[name].calls, "seconds": probes[name].seconds}
             for name, _ in SETUP_PROBES}
    result = {"child_start": t_start, "phases": stamps, "steps": steps, "step_s": stamps["steps"] / (steps - 1),
              "per_step": per_step, "setup": setup, "args": args}
    if profiler is not None:
        import io
        import pstats

        s = io.StringIO()
        pstats.Stats(profiler, stream=s).sort_stats("cumulative").print_stats(a.cprofile_top)
        result["cprofile"] = s.getvalue()
    atexit.register(_exit_stamp, "atexit_start")  # registered last, runs first
    result["child_end"] = time.time()
    return result


def table(r: dict) -> str:
    ph = r["phases"]
    fixed = ["interpreter"] + [f"import {n}" for n in IMPORTS] + ["parse + build", "fit set-up", "first step",
                                                                  "teardown", "exit"]
    lines = [f"{'phase':<34}{'seconds':>10}", "-" * 44]
    for k in fixed:
        lines.append(f"{k:<34}{ph[k]:>10.3f}")
    lines.append(f"{'fixed cost (sum of the above)':<34}{r['fixed_s']:>10.3f}")
    lines.append(f"{'steps (' + str(r['steps'] - 1) + ' after the first)':<34}{ph['steps']:>10.3f}")
    lines.append(f"{'whole process':<34}{r['wall_s']:>10.3f}")
    for k, v in r.get("exit_detail", {}).items():
        lines.append(f"{'  exit: ' + k:<34}{v:>10.3f}")
    lines += ["", f"{'inside the fixed cost':<34}{'calls':>8}{'seconds':>10}"]
    for k, v in r["setup"].items():
        lines.append(f"{k:<34}{v['calls']:>8}{v['seconds']:>10.3f}" + ("" if v["found"] else "  (probe absent)"))
    lines += ["", f"{'per whole step':<34}{'calls':>8}{'ms/step':>10}"]
    for k, v in r["per_step"].items():
        lines.append(f"{k:<34}{v['calls']:>8}{1000 * v['s_per_step']:>10.2f}" + ("" if v["found"] else "  (probe absent)"))
    lines.append(f"{'other (loop, hooks)':<34}{'':>8}{1000 * r['other_s_per_step']:>10.2f}")
    lines.append(f"{'whole step':<34}{'':>8}{1000 * r['step_s']:>10.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=CONFIG)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of the fit (at least 3)")
    p.add_argument("--workers", type=int, default=None, help="stream.num_workers (default: the config's)")
    p.add_argument("--run-dir", default="outputs/profile/runs")
    p.add_argument("--out", default="outputs/profile/fit.json")
    p.add_argument("--cprofile", action="store_true", help="also profile fit with cProfile (slows every step)")
    p.add_argument("--cprofile-top", type=int, default=30)
    p.add_argument("--code", default=ROOT, help="the mmalign tree to profile, first on the child's PYTHONPATH "
                                                "(e.g. a checkout of main, for a before/after pair)")
    p.add_argument("--full-exit", action="store_true", help="end with the interpreter's full teardown instead of "
                                                             "mmalign.cli.exit_fast (as before it existed)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="CLI options for fit, after --")
    a = p.parse_args()
    if a.steps < 3:
        p.error(f"--steps {a.steps}: need at least 3 (a first step and two to average)")
    if a.child:
        print("PROFILE_JSON " + json.dumps(child(a)), flush=True)
        if not a.full_exit:  # end as `python -m mmalign` does (a tree from before exit_fast has none)
            try:
                from mmalign.cli import exit_fast
            except ImportError:
                return
            exit_fast(0)
        return
    path = os.pathsep.join([os.path.abspath(a.code), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    t_launch = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *sys.argv[1:]], env=env, cwd=os.getcwd(),
                          stdout=subprocess.PIPE, text=True)
    t_end = time.time()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE_JSON ")]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout[-4000:])
        raise SystemExit(f"the profiled fit failed (exit status {proc.returncode}); its output is above")
    r = json.loads(lines[-1][len("PROFILE_JSON "):])
    r["phases"]["interpreter"] = r["child_start"] - t_launch
    r["phases"]["exit"] = t_end - r["child_end"]
    stamps = dict(ln.split()[1:] for ln in proc.stdout.splitlines() if ln.startswith("PROFILE_EXIT "))
    if len(stamps) == 2:  # exit = the atexit handlers (loggers, loader workers, ...) + interpreter teardown
        r["exit_detail"] = {"atexit handlers": float(stamps["atexit_end"]) - float(stamps["atexit_start"]),
                            "interpreter teardown": t_end - float(stamps["atexit_end"])}
    r["wall_s"] = t_end - t_launch
    r["fixed_s"] = r["wall_s"] - r["phases"]["steps"]
    r["other_s_per_step"] = r["step_s"] - sum(v["s_per_step"] for v in r["per_step"].values())
    text = table(r)
    print(text)
    if "cprofile" in r:
        print("\n" + r["cprofile"])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({**r, "table": text, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
