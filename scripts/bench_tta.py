#!/usr/bin/env python
"""TTA corruption benchmark: source / norm / tent / tent_filter / cafa on digits-C and shapes-C.

Protocol (REFERENCES.md "Benchmark protocol"): severity 5, the 15 corruptions in benchmark order,
batch 200 (or the largest the set allows), error %. The continual setting is the first pass of
the long-term run (the stream and methods are deterministic, so a separate one-pass run would
repeat it exactly); long-term is the last of ``--rounds`` passes. Seeds permute the samples inside
each domain (domain order fixed). Throughput = images/s of each method over the whole run,
measured in the same process, as a ratio to plain inference (``source``).

    python scripts/bench_tta.py --digits-ckpt D.ckpt --shapes-ckpt S.ckpt --data-root data \\
        --out /work/scratch/tta/bench.json
Sources are trained with ``python -m mmalign fit -c configs/classify/{digits,shapes}.yaml``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

DATASETS = {  # clean test split, labelled source split, label key
    "digits": ("digits/test", "digits/train", "cls"),
    "shapes": ("shapes/test", "shapes/train", "shape_id"),
}


def run_dataset(name, ckpt, args, log):
    import torch

    from mmalign.tta import TTAModel
    from mmalign.tta.pipeline import adapt, method_summary, source_statistics
    from mmalign.tta.stream import CorruptionStream

    test, train, label_key = DATASETS[name]
    model = TTAModel(ckpt, methods=args.methods, lr=args.lr, cafa_shrinkage=args.shrinkage)
    stream = CorruptionStream(data_root=args.data_root, domains_dir=f"{name}-c", corruptions=args.corruptions,
                              severities=args.severity, test_shards=test, train_shards=train, label_key=label_key,
                              generate=name, batch_size=args.batch_size, num_workers=0, cache_decoded=True,
                              preprocess=model.preprocess, source_max_samples=args.source_samples)
    stream.prepare_data()
    stream.setup("test")
    stats = source_statistics(model, stream, "outputs/bench", "cpu", log, args.source_samples) \
        if "cafa" in args.methods else None
    out = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        stream.seed = seed
        t0 = time.time()
        res, methods = adapt(model, stream, "continual", args.rounds, args.max_batches, log=lambda s: None,
                             stats=stats)
        rounds = res.round_errors()
        out.append({"seed": seed, "error_by_round": rounds, "images_per_s": res.throughput(),
                    "domain_errors_round1": res.domain_errors(0),
                    "domain_errors_last": res.domain_errors(args.rounds - 1),
                    **method_summary(methods), "seconds": time.time() - t0})
        log(f"{name} seed {seed} ({time.time() - t0:.0f}s): " + "  ".join(
            f"{m} {r[0]:.1f}->{r[-1]:.1f}" for m, r in rounds.items()))
    n_images = sum(len(stream._decoded[d][1]) for d in stream.domain_names)
    return {"checkpoint": ckpt, "domains": stream.domain_names, "images_per_pass": n_images, "runs": out}


def table(results, methods, rounds):
    def cell(vals):
        return f"{statistics.mean(vals):5.1f}±{statistics.pstdev(vals):3.1f}" if len(vals) > 1 else f"{vals[0]:5.1f}"

    head = f"{'dataset':<8}{'setting':<18}" + "".join(f"{m:>14}" for m in methods)
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        for label, idx in (("continual (r1)", 0), (f"long-term (r{rounds})", rounds - 1)):
            vals = {m: [run["error_by_round"][m][idx] for run in res["runs"]] for m in methods}
            lines.append(f"{name:<8}{label:<18}" + "".join(f"{cell(vals[m]):>14}" for m in methods))
        tp = {m: statistics.mean(run["images_per_s"][m] for run in res["runs"]) for m in methods}
        if "source" in tp:
            lines.append(f"{name:<8}{'img/s (x source)':<18}" +
                         "".join(f"{tp[m]:>7.0f} ({tp[m] / tp['source']:.2f})" for m in methods))
    return "\n".join(lines)


def main(argv=None):
    from datamodules.corruptions import CORRUPTIONS
    from mmalign.tta.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits-ckpt")
    p.add_argument("--shapes-ckpt")
    p.add_argument("--data-root", default="data", help="holds digits/, shapes/ (generated if missing), *-c/")
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
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
    text = table(results, args.methods, args.rounds)
    print(text)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "results": results, "table": text}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
