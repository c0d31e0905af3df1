#!/usr/bin/env python
"""TTA benchmark on digits: the corruption severity sweep, the mild "hidden shift" case, every method,
seeds that change the source model and the shift draw; and the tuning of the defaults on validation
shifts and ``TUNING_SEEDS`` (never reported).

A seed changes (1) the source model's training seed (``fit -c configs/classify/digits.yaml
--seed_everything=S``, cached under ``--root``), (2) the corruption draw (``benchmark.seed``) and
the mild shifts' draw, and (3) the sample order inside each corruption domain. All arms of one seed
share that source model and run in lockstep on the same batches: comparisons are paired.

Arms: ``source``; ``norm``, ``tent``, ``tent_filter``, ``cafa``, ``eata``, ``sar`` with the shipped
defaults (source-prior normalisation ``norm.prior``; the guard on every learning arm); and, as issue 26
measured them, ``norm_n0``, ``tent_n0``, ``tent_filter_n0`` (pure test-batch statistics, no guard).

Modes (``tune`` and ``sensitivity`` live in ``tta_tuning.py``):
  tune         TUNING_SEEDS on the validation shifts (``tta_shifts.VAL_MILD``/``VAL_STRONG``, class-sorted and
               shuffled): error of norm and tent per prior strength N with and without the guard's source
               fallback, the guard's signals on healthy runs and on forced collapses (tent at 100x and
               1000x the learning rate), with the guard watching and resetting.
  report       REPORT_SEEDS: the mild shifts (``REPORT_MILD`` image folders read in folder order, i.e.
               class-sorted, as a user's folder is; ``--mild-rounds`` continual rounds); severity 1..5 (the
               15 corruptions in benchmark order, shuffled inside each domain, one round; severity 5 for
               ``--rounds`` rounds: long-term); then the claims under Holm correction. Seeds may run in
               separate processes and be joined with ``--merge``.
  sensitivity  REPORT_SEEDS: what the chosen prior costs on the reported streams (shown, never used to
               choose).

    python scripts/bench_tta.py tune --out outputs/bench/tta_tune.json
    python scripts/bench_tta.py report --out outputs/bench/tta_report.json               # the full recipe
    # the reduced recipe of docs/tta.md, one process per seed, then joined:
    python scripts/bench_tta.py report --seeds 0 --max-batches 1 \
        --sweep-corruptions gaussian_noise defocus_blur snow contrast jpeg_compression --out .../tta_report_s0.json
    python scripts/bench_tta.py report --merge .../tta_report_s*.json --max-batches 1 --sweep-corruptions ... \
        --out outputs/bench/tta_report.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchstats import REPORT_SEEDS, TUNING_SEEDS, ClaimTable, cell, interval, save
from tta_shifts import REPORT_MILD, write_shift_folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARMS = ("source", "norm", "tent", "tent_filter", "cafa", "eata", "sar")
OLD_ARMS = ("norm_n0", "tent_n0", "tent_filter_n0")  # issue 26's measurement: pure batch statistics, no guard


def log(msg: str) -> None:
    print(msg, flush=True)


def source_checkpoint(seed: int, args) -> str:
    """The digits classifier trained with ``seed`` (trained once, then cached)."""
    run = os.path.join(args.root, "sources", f"seed{seed}")
    ckpt = os.path.join(run, "checkpoints", "last.ckpt")
    if not os.path.isfile(ckpt):
        t0 = time.time()
        cmd = [sys.executable, "-m", "mmalign", "fit", "-c", os.path.join(ROOT, "configs/classify/digits.yaml"),
               f"--seed_everything={seed}", f"--trainer.default_root_dir={run}", "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", f"--data.init_args.shards.data_root={args.data_root}",
               "--data.init_args.stream.num_workers=0"]
        with open(os.path.join(args.root, f"fit_seed{seed}.log"), "w") as fh:
            subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        log(f"source seed {seed}: trained in {time.time() - t0:.0f}s -> {ckpt}")
    return ckpt


def make_stream(model, seed: int, args, *, severity: int | None = None, folders: dict | None = None,
                shuffle: bool = True, corruptions: str | list[str] = "all"):
    """The one place this script builds a datamodule: the corruption stream of one severity, or the given
    image folders as domains (``shuffle=False``: folder order, i.e. class-sorted)."""
    from mmalign.tta import CorruptionStream, TargetStream

    common = dict(stream={"batch_size": args.batch_size, "num_workers": 0, "seed": seed}, generate="digits",
                  label={"num_classes": model.num_classes}, preprocess=model.preprocess)
    shards = {"data_root": args.data_root, "train": "digits/train"}
    if severity is not None:
        stream = CorruptionStream(shards={**shards, "test": "digits/test"}, adapt={"cache_decoded": True},
                                  benchmark={"dir": os.path.join(args.root, "corrupted", f"seed{seed}"),
                                             "corruptions": corruptions, "severities": severity, "seed": seed}, **common)
    else:
        stream = TargetStream(shards=shards, adapt={"cache_decoded": True, "shuffle": shuffle},
                              target={"domains": folders, "labelled": True}, **common)
    stream.prepare_data()
    stream.setup("test")
    return stream


def variant(cfg, prior: float | None = None, lr: float | None = None):
    """``cfg`` with another prior strength and/or learning rate."""
    from dataclasses import replace

    norm = cfg.norm if prior is None else replace(cfg.norm, prior=prior)
    adapt = cfg.adapt if lr is None else replace(cfg.adapt, lr=lr)
    return replace(cfg, adapt=adapt, norm=norm)


def arm_config(model, arm: str):
    """(method name, TTAConfig, guarded) of an arm."""
    if arm.endswith("_n0"):
        return arm[:-3], variant(model.cfg, prior=0.0), False
    return arm, model.cfg, arm not in ("source", "norm")


def build_arms(model, arms, stats, fisher, guard_spec):
    from mmalign.tta.guard import Guard
    from mmalign.tta.methods import build_method

    methods, guards = {}, {}
    for arm in arms:
        name, cfg, guarded = arm_config(model, arm)
        methods[arm] = build_method(name, model.source, cfg, stats, fisher)
        if guarded:
            guards[arm] = Guard(guard_spec)
    return methods, guards


def seed_model(seed: int, args, sources_only: bool = False):
    """The seed's source model as a TTAModel, with CAFA's statistics and EATA's Fisher information."""
    from mmalign.tta import TTAModel
    from mmalign.tta.cafa_stats import compute_source_stats
    from mmalign.tta.eata import fisher_information
    from mmalign.tta.pipeline import labelled_batches

    model = TTAModel(source={"checkpoint": source_checkpoint(seed, args), "kind": "classifier"}, methods=["source"])
    if sources_only:
        return model, None, None
    src = make_stream(model, seed, args, folders={"clean": os.path.join(args.data_root, "digits", "test")})
    stats = compute_source_stats(model.source, labelled_batches(src, 2000), model.num_classes, "auto", 0.1, 2000)
    e = model.cfg.eata
    fisher = fisher_information(model.source, model.cfg, labelled_batches(src, e.fisher_samples, e.fisher_batch))
    return model, stats, fisher


def run_arms(model, stream, arms, stats, fisher, rounds, guard_spec=None, setting="continual", max_batches=None):
    """The arms in lockstep; the default ones guarded as ``adapt`` guards them (the fallback to the source
    statistics when ``guard.source_fallback``, the reset on collapse), the ``_n0`` ones bare."""
    from mmalign.tta.methods import Norm
    from mmalign.tta.stream import run_stream

    spec = guard_spec or model.guard_spec
    methods, guards = build_arms(model, arms, stats, fisher, spec)
    fallback = [a for a in arms if a != "source" and not a.endswith("_n0")] if spec.source_fallback else []
    t0 = time.time()
    res = run_stream(methods, stream, setting, rounds, max_batches, guards=guards, reference=model.source,
                     baseline=Norm(model.source, model.cfg), fallback=fallback,
                     small_batch=model.cfg.adapt.small_batch, min_batch=model.cfg.adapt.min_batch,
                     min_class_spread=spec.min_class_spread)
    return {"error_by_round": res.round_errors(), "domain_errors_last": res.domain_errors(rounds - 1),
            "agreement_by_round": res.round_agreement(), "resets": res.resets,
            "fallback_batches": {a: m.fallbacks for a, m in methods.items()},
            "guard_extremes": {a: g.extremes for a, g in guards.items()},
            "images_per_s": res.throughput(), "seconds": time.time() - t0}


# ------------------------------------------------------------------------------------------------ report
def report_seed(seed: int, args) -> dict:
    t0 = time.time()
    model, stats, fisher = seed_model(seed, args)
    out = {"seed": seed, "checkpoint": model.source_checkpoint}
    folders = write_shift_folders(os.path.join(args.data_root, "digits", "test"),
                                  os.path.join(args.root, "shifts", f"seed{seed}"), REPORT_MILD, seed)
    stream = make_stream(model, seed, args, folders=folders, shuffle=False)
    out["mild"] = run_arms(model, stream, args.arms + OLD_ARMS, stats, fisher, args.mild_rounds)  # always whole
    log(f"seed {seed} mild: " + _brief(out["mild"]))
    for sev in args.severities:
        rounds = args.rounds if sev == 5 else 1
        arms = args.arms + (OLD_ARMS if sev == 5 else ())
        corrs = "all" if sev == 5 else args.sweep_corruptions
        out[f"severity{sev}"] = run_arms(model, make_stream(model, seed, args, severity=sev, corruptions=corrs), arms,
                                         stats, fisher, rounds, max_batches=args.max_batches)
        log(f"seed {seed} severity {sev}: " + _brief(out[f"severity{sev}"]))
    out["seconds"] = time.time() - t0
    log(f"seed {seed} done in {out['seconds']:.0f}s")
    return out


def _brief(res) -> str:
    return "  ".join(f"{a} {e[0]:.1f}" + (f"->{e[-1]:.1f}" if len(e) > 1 else "") for a, e in res["error_by_round"].items())


def summarise(runs, args) -> tuple[str, list]:
    lines = []

    def err(case, arm, idx):
        return [r[case]["error_by_round"][arm][idx] for r in runs]

    mild_arms = args.arms + OLD_ARMS
    if args.max_batches:
        lines.append(f"corruption streams: the first {args.max_batches} batch(es) of {args.batch_size} of every "
                     "domain (the mild shifts whole)")
    lines += [f"\nmild shifts {list(REPORT_MILD)} (class-sorted image folders, continual), error %, "
              f"mean ± 95% interval over seeds {[r['seed'] for r in runs]}",
              f"{'method':<16}{'round 1':>16}{f'round {args.mild_rounds}':>16}{'agree r1 %':>12}"]
    for arm in mild_arms:
        agree = interval([r["mild"]["agreement_by_round"][arm][0] for r in runs]).mean
        lines.append(f"{arm:<16}{cell(err('mild', arm, 0)):>16}{cell(err('mild', arm, -1)):>16}{agree:>12.1f}")
    sweep = "15 corruptions" if args.sweep_corruptions == "all" else f"corruptions {args.sweep_corruptions} at 1-4"
    lines += [f"\nseverity sweep ({sweep}, 15 at 5; continual, round 1), error %",
              f"{'method':<16}" + "".join(f"{f'sev {s}':>15}" for s in args.severities)]
    for arm in args.arms:
        lines.append(f"{arm:<16}" + "".join(f"{cell(err(f'severity{s}', arm, 0)):>15}" for s in args.severities))
    if 5 in args.severities:
        lines += [f"\nseverity 5, long-term ({args.rounds} rounds, continual), error %",
                  f"{'method':<16}{'round 1':>16}{f'round {args.rounds}':>16}"]
        for arm in args.arms + OLD_ARMS:
            lines.append(f"{arm:<16}{cell(err('severity5', arm, 0)):>16}{cell(err('severity5', arm, -1)):>16}")
    resets = {case: sum(len(r[case]["resets"]) for r in runs) for case in runs[0] if isinstance(runs[0][case], dict)}
    lines.append(f"\nguard resets (all seeds): {resets}")
    claims = ClaimTable()
    R = args.rounds
    ran = set(runs[0]["mild"]["error_by_round"])  # --arms may leave some out: their claims are not made

    def better(name, case, a, b, idx):
        if {a, b} <= ran:
            claims.better(name, err(case, a, idx), err(case, b, idx), False, paired=True)

    if 5 in args.severities:
        better(f"filter prevents long-term collapse: tent_filter < tent at sev 5 round {R}",
               "severity5", "tent_filter", "tent", -1)
        better(f"idem, pure batch statistics (paper setting): tent_filter_n0 < tent_n0 at round {R}",
               "severity5", "tent_filter_n0", "tent_n0", -1)
        better("CAFA <= TENT error: cafa < tent at sev 5 round 1", "severity5", "cafa", "tent", 0)
        for peer in ("eata", "sar"):
            better(f"{peer} < tent at sev 5 round 1", "severity5", peer, "tent", 0)
    margin = args.margin
    for arm in ("norm", "tent", "tent_filter", "cafa", "eata", "sar"):
        if arm in args.arms:
            diff = [a - b for a, b in zip(err("mild", arm, -1), err("mild", "source", -1))]
            name = (f"guarded default {arm} no worse than source on mild shifts (round {args.mild_rounds}, "
                    f"margin {margin} points)")
            if len(set(diff)) == 1:  # no spread, no test: the values say it directly
                lines.append(f"{name}: {'holds' if diff[0] <= margin else 'fails'} on every seed alike "
                             f"(difference {diff[0]:+.2f} points on each; no interval to test)")
            else:
                claims.target(name, diff, margin, "lower")
    for peer in ("eata", "sar"):
        better(f"{peer} < tent on mild shifts (round {args.mild_rounds})", "mild", peer, "tent", -1)
    return "\n".join(lines), claims


def _default_prior() -> float:
    from mmalign.tta.specs import NormSpec

    return NormSpec().prior


def _default_guard() -> dict:
    from dataclasses import asdict

    from mmalign.tta.specs import GuardSpec

    return asdict(GuardSpec())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["tune", "report", "sensitivity"])
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: TUNING_SEEDS / REPORT_SEEDS")
    p.add_argument("--root", default="outputs/bench/tta", help="source models, corrupted and shifted data")
    p.add_argument("--data-root", default="data", help="holds digits/ (generated when missing)")
    p.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--rounds", type=int, default=3, help="rounds at severity 5 (long-term)")
    p.add_argument("--mild-rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=DEFAULT_ARMS)
    p.add_argument("--margin", type=float, default=0.5, help="non-inferiority margin (points) of the no-harm claims")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batches", type=int, default=None,
                   help="per corruption domain: a shorter stream (a report run with it says so in its recipe and tables)")
    p.add_argument("--sweep-corruptions", nargs="+", default="all",
                   help="the corruptions of severities 1-4 (default: all 15; severity 5 always streams all 15)")
    p.add_argument("--merge", nargs="+", default=None, help="report: summarise these earlier result files instead")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.arms = tuple(args.arms)
    args.root = os.path.abspath(args.root)  # folders handed to the streams are not read under data_root
    os.makedirs(args.root, exist_ok=True)
    seeds = args.seeds or list(TUNING_SEEDS if args.mode == "tune" else REPORT_SEEDS)
    if args.mode != "tune" and set(seeds) & set(TUNING_SEEDS):
        p.error(f"seeds {sorted(set(seeds) & set(TUNING_SEEDS))} are tuning seeds: they are never reported.")
    t0 = time.time()
    if args.mode in ("tune", "sensitivity"):
        from tta_tuning import sensitivity_seed, summarise_sensitivity, summarise_tuning, tune_seed

        run_seed, summarise_mode = {"tune": (tune_seed, summarise_tuning),
                                    "sensitivity": (sensitivity_seed, summarise_sensitivity)}[args.mode]
        runs = [run_seed(s, args) for s in seeds]
        text = summarise_mode(runs)
        print(text)
        save(args.out or f"outputs/bench/tta_{args.mode}.json", {"args": vars(args), "runs": runs, "table": text})
        return
    recipe = {"rounds": args.rounds, "mild_rounds": args.mild_rounds, "severities": list(args.severities),
              "arms": list(args.arms), "batch_size": args.batch_size, "max_batches": args.max_batches,
              "sweep_corruptions": args.sweep_corruptions,
              "norm_prior": _default_prior(), "guard": _default_guard()}
    if args.merge:  # per-seed rows of earlier runs of the same recipe (seeds run in separate processes)
        from benchstats import load_rows

        runs = load_rows(args.merge, "runs", match=recipe)
        if sorted(r["seed"] for r in runs) != sorted(set(r["seed"] for r in runs)):
            p.error("the merged files hold a seed twice.")
    else:
        runs = []
        for s in seeds:  # each finished seed is saved at once: a stopped run keeps its finished seeds
            runs.append(report_seed(s, args))
            save((args.out or "outputs/bench/tta_report.json") + ".partial", {"config": recipe, "runs": runs})
    text, claims = summarise(runs, args)
    print(text)
    rows = claims.print("claims")
    log(f"total {time.time() - t0:.0f}s")
    save(args.out or "outputs/bench/tta_report.json", {"args": vars(args), "config": recipe, "runs": runs,
                                                       "table": text, "claims": rows, "seconds": time.time() - t0})


if __name__ == "__main__":
    sys.exit(main())
