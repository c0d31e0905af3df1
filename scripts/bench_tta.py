#!/usr/bin/env python
"""TTA corruption benchmark on digits-C and shapes-C, with seed intervals and significance tests.

Protocol (REFERENCES.md "Benchmark protocol"): the 15 corruptions at severity 5 in benchmark order,
batch 200 (or the largest the set allows), error %. Continual = round 1 of the run; long-term = the
last of ``--rounds`` passes over the whole stream (never reset). A seed permutes the samples inside
each domain (the domain order is fixed); methods are deterministic given the order, so seeds are
the run-to-run variance.

Arms (all in lockstep on the same batches, one process):
  source, norm, tent                     the baselines
  filter                                 TENT + wisdom-of-crowds filter, diversity over the kept samples
  filter_batch                           the same with the diversity term over the whole batch (the
                                         public reimplementation's reading)
  cafa_classwise, cafa_shared            CAFA with class-wise or shared (tied) covariance

For every arm: mean ± 95% interval over the seeds (``scripts/benchstats.py``); the comparisons the
questions need (filter_batch vs filter and vs tent in round 1; cafa_classwise vs cafa_shared) with
Welch's test. Throughput = images/s of each arm over the run, as a ratio to plain inference.

    python scripts/bench_tta.py --digits-ckpt D.ckpt --shapes-ckpt S.ckpt --data-root data32 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import time

from benchstats import cell, compare, save

DATASETS = {  # clean test split, labelled source split, label key
    "digits": ("digits/test", "digits/train", "cls"),
    "shapes": ("shapes/test", "shapes/train", "shape_id"),
}
ARMS = ("source", "norm", "tent", "filter", "filter_batch", "cafa_classwise", "cafa_shared")
# (arm A, arm B, round index, which error is better): Welch's test of A against B at that round
QUESTIONS = [("norm", "source", 0, "lower"), ("tent", "norm", 0, "lower"), ("cafa_classwise", "tent", 0, "lower"),
             ("filter_batch", "filter", 0, "lower"), ("filter_batch", "tent", 0, "lower"), ("filter", "tent", 0, "lower"),
             ("cafa_classwise", "cafa_shared", 0, "lower"), ("cafa_classwise", "cafa_shared", -1, "lower"),
             ("filter", "tent", -1, "lower"), ("tent", "norm", -1, "lower")]
# arms whose drift over the stream is tested: the last round against round 1 (paired by seed)
DRIFT = ("tent", "filter", "filter_batch", "cafa_classwise", "cafa_shared")


def build_arms(model, stream, arms, shrinkage, source_samples, log):
    """{arm: TTAMethod}; CAFA's two statistics come from the same labelled source subset."""
    from mmalign.tta.cafa_stats import compute_source_stats
    from mmalign.tta.methods import TTAConfig, build_method
    from mmalign.tta.pipeline import labelled_batches

    cfg = model.cfg
    stats = {}
    for cov in ("classwise", "shared"):
        if f"cafa_{cov}" in arms:
            stats[cov] = compute_source_stats(model.source, labelled_batches(stream, source_samples), model.num_classes,
                                              cov, shrinkage, source_samples)
            log(f"CAFA {cov} statistics from {stats[cov].meta['num_samples']} source samples")
    batch_cfg = TTAConfig(**{**cfg.__dict__, "filter_diversity": "batch"})
    table = {"source": lambda: build_method("source", model.source, cfg),
             "norm": lambda: build_method("norm", model.source, cfg),
             "tent": lambda: build_method("tent", model.source, cfg),
             "filter": lambda: build_method("tent_filter", model.source, cfg),
             "filter_batch": lambda: build_method("tent_filter", model.source, batch_cfg),
             "cafa_classwise": lambda: build_method("cafa", model.source, cfg, stats.get("classwise")),
             "cafa_shared": lambda: build_method("cafa", model.source, cfg, stats.get("shared"))}
    return {a: table[a]() for a in arms}


def run_dataset(name, ckpt, args, log):
    import torch

    from mmalign.tta import CorruptionStream, TTAModel
    from mmalign.tta.stream import run_stream

    test, train, label_key = DATASETS[name]
    model = TTAModel(ckpt, methods=["source"], lr=args.lr)
    stream = CorruptionStream(shards={"data_root": args.data_root, "test": test, "train": train},
                              stream={"batch_size": args.batch_size, "num_workers": 0}, generate=name,
                              label={"key": label_key, "num_classes": model.num_classes}, adapt={"cache_decoded": True},
                              benchmark={"dir": f"{name}-c", "corruptions": args.corruptions,
                                         "severities": args.severity},
                              preprocess=model.preprocess)
    stream.prepare_data()
    stream.setup("test")
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        stream.seed = seed
        methods = build_arms(model, stream, args.arms, args.shrinkage, args.source_samples, log)
        t0 = time.time()
        res = run_stream(methods, stream, "continual", args.rounds, args.max_batches)
        rounds = res.round_errors()
        runs.append({"seed": seed, "error_by_round": rounds, "images_per_s": res.throughput(),
                     "domain_errors_round1": res.domain_errors(0), "domain_errors_last": res.domain_errors(args.rounds - 1),
                     "filter_kept_fraction": {n: m.kept_fraction for n, m in methods.items() if hasattr(m, "kept_fraction")},
                     "seconds": time.time() - t0})
        log(f"{name} seed {seed} ({time.time() - t0:.0f}s): " + "  ".join(
            f"{m} {r[0]:.1f}->{r[-1]:.1f}" for m, r in rounds.items()))
    return {"checkpoint": ckpt, "domains": stream.domain_names, "runs": runs}


def summarise(results, arms, rounds):
    lines, verdicts = [], {}
    head = f"{'dataset':<8}{'setting':<16}" + "".join(f"{a:>16}" for a in arms)
    lines += [head, "-" * len(head)]
    for name, res in results.items():
        runs = res["runs"]
        for label, idx in (("round 1", 0), (f"round {rounds}", rounds - 1)):
            lines.append(f"{name:<8}{label:<16}" + "".join(
                f"{cell([r['error_by_round'][a][idx] for r in runs]):>16}" for a in arms))
        tp = {a: sum(r["images_per_s"][a] for r in runs) / len(runs) for a in arms}
        lines.append(f"{name:<8}{'x source speed':<16}" + "".join(
            f"{tp[a] / tp['source']:>16.2f}" if "source" in tp else f"{'':>16}" for a in arms))
        def record(key, c, better, names):
            verdicts[key] = {"diff_pct_points": c.diff, "p": c.p_value, "significant": c.significant,
                             "overlap": c.overlap, "verdict": c.verdict(better, names=names)}
            lines.append(f"  {key}: {c.diff:+.2f} points, {verdicts[key]['verdict']}")

        err = lambda arm, idx: [r["error_by_round"][arm][idx] for r in runs]  # noqa: E731
        for a, b, idx, better in QUESTIONS:
            if a in arms and b in arms:
                record(f"{name}: {a} vs {b}, round {idx + 1 if idx >= 0 else rounds}", compare(err(a, idx), err(b, idx)),
                       better, (a, b))
        for a in DRIFT:
            if a in arms and rounds > 1:
                record(f"{name}: {a} round {rounds} vs round 1", compare(err(a, -1), err(a, 0), paired=True),
                       "lower", (f"round {rounds}", "round 1"))
    return "\n".join(lines), verdicts


def main(argv=None):
    from datamodules.corruptions import CORRUPTIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits-ckpt")
    p.add_argument("--shapes-ckpt")
    p.add_argument("--data-root", default="data", help="holds digits/, shapes/ (generated if missing), *-c/")
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--max-batches", type=int, default=None, help="per domain (quick checks)")
    p.add_argument("--source-samples", type=int, default=2000, help="labelled source subset for CAFA")
    p.add_argument("--shrinkage", type=float, default=0.1)
    p.add_argument("--out", default="outputs/bench/tta.json")
    args = p.parse_args(argv)
    ckpts = {k: v for k, v in (("digits", args.digits_ckpt), ("shapes", args.shapes_ckpt)) if v}
    if not ckpts:
        p.error("give --digits-ckpt and/or --shapes-ckpt (train with python -m mmalign fit -c "
                "configs/classify/digits.yaml).")
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = {name: run_dataset(name, ck, args, log) for name, ck in ckpts.items()}
    text, verdicts = summarise(results, args.arms, args.rounds)
    print(text)
    save(args.out, {"args": vars(args), "results": results, "verdicts": verdicts, "table": text})


if __name__ == "__main__":
    sys.exit(main())
