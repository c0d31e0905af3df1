#!/usr/bin/env python
"""Speech-text alignment benchmark: which losses help, on held-out voices and held-out texts.

    python scripts/bench_speech.py --data /tmp/spoken --steps 300 --seeds 0 1 2

Arms (same data, seed, model size and steps; only the loss weights differ):
  contrastive            multi-positive InfoNCE only (no CTC head: no WER / onset numbers)
  contrastive+ctc        + CTC (weight 1)
  contrastive+ctc+dtw    + hard-DTW consistency between speech frames and text tokens (cosine cost)
  contrastive+ctc+dtw_l2 + the same hard minimum with the squared-L2 cost (Peyser et al.'s reading)
  contrastive+ctc+sdtw   + soft-DTW divergence consistency (``--arms`` to include it; ~3x a DTW step)

Each arm trains for ``--steps`` steps and is evaluated on the ``test`` split (voices and texts
never seen in training): recall@1 both ways (several clips per transcript are all correct), WER
and CER of greedy CTC decoding, word-onset error of CTC forced alignment (ms) next to the
length-proportional baseline. When the data holds a ``val`` split (``--num-val``: voices and texts
held out from both train and test) it is scored too, as ``val_<metric>``: choose recipes on
those, report the test columns. Prints a table and writes JSON (``--out``). The spoken set is
generated into ``--data`` on first use (needs espeak-ng: ``apt-get install -y espeak-ng``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchstats import ClaimTable, against, cell, compare, load_rows, save  # noqa: E402

ARMS = {
    "contrastive": dict(contrastive_weight=1.0, ctc_weight=0.0, consistency_weight=0.0),
    "contrastive+ctc": dict(contrastive_weight=1.0, ctc_weight=1.0, consistency_weight=0.0),
    "contrastive+ctc+dtw": dict(contrastive_weight=1.0, ctc_weight=1.0, consistency_weight=1.0,
                                consistency_mode="dtw"),
    "contrastive+ctc+dtw_l2": dict(contrastive_weight=1.0, ctc_weight=1.0, consistency_weight=1.0,
                                   consistency_mode="dtw", consistency_cost="sqeuclidean"),
    "contrastive+ctc+sdtw": dict(contrastive_weight=1.0, ctc_weight=1.0, consistency_weight=1.0,
                                 consistency_mode="soft_dtw", consistency_gamma=0.1),
}
COLUMNS = [("speech2text_r1", "s2t R@1"), ("text2speech_r1", "t2s R@1"), ("speech2text_r5", "s2t R@5"),
           ("wer", "WER"), ("cer", "CER"), ("onset_error_ms", "onset ms"), ("onset_baseline_ms", "baseline ms"),
           ("alignment", "align"), ("uniformity_speech", "unif sp"),
           ("val_speech2text_r1", "val s2t R@1"), ("val_text2speech_r1", "val t2s R@1"), ("val_wer", "val WER")]


def ensure_data(root: str, num_train: int, num_test: int, seed: int, num_val: int = 0) -> dict:
    from datamodules.generate import generate_dataset

    return generate_dataset("spoken", root, seed=seed, num_train=num_train, num_test=num_test, num_val=num_val)


def run_arm(name: str, args, root: str) -> dict:
    import lightning.pytorch as pl

    from datamodules.audio_text import AudioTextDataModule
    from mmalign.speech.module import SpeechTextAligner

    pl.seed_everything(args.seed, verbose=False)
    towers = dict(d_model=args.d_model, embed_dim=args.d_model, speech_layers=args.speech_layers,
                  text_layers=args.text_layers, shared_layers=args.shared_layers, heads=4, speech_block=args.block)
    model = SpeechTextAligner(towers=towers, losses=ARMS[name],
                              optim={"lr": args.lr, "warmup_steps": min(50, args.steps // 10)})
    has_val = os.path.isdir(os.path.join(root, "val"))
    dm = AudioTextDataModule(shards={"train": os.path.join(root, "train"), "val": os.path.join(root, "test"),
                                     "extra_val": {"select": os.path.join(root, "val")} if has_val else None},
                             stream={"batch_size": args.batch_size, "num_workers": 0, "seed": args.seed},
                             preprocess=model.preprocess)
    trainer = pl.Trainer(max_steps=args.steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1.0, accelerator="cpu", devices=1)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    train_s = time.perf_counter() - t0
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.validate(model, dm, verbose=False)
    metrics = {k.split("/", 1)[1]: v for k, v in model.eval_results["val"].items()}  # the test split
    if has_val:
        metrics.update({"val_" + k.split("/", 1)[1]: v for k, v in model.eval_results["select"].items()})
    return {"arm": name, "weights": ARMS[name], "train_seconds": round(train_s, 1),
            "seconds_per_step": round(train_s / args.steps, 3), **metrics}


QUESTIONS = [("contrastive+ctc", "contrastive", "speech2text_r1", "higher"),
             ("contrastive+ctc", "contrastive", "text2speech_r1", "higher"),
             ("contrastive+ctc+dtw", "contrastive+ctc", "speech2text_r1", "higher"),
             ("contrastive+ctc+dtw", "contrastive+ctc", "wer", "lower"),
             ("contrastive+ctc+dtw_l2", "contrastive+ctc", "speech2text_r1", "higher"),
             ("contrastive+ctc+dtw_l2", "contrastive+ctc", "wer", "lower"),
             ("contrastive+ctc+sdtw", "contrastive+ctc", "speech2text_r1", "higher"),
             ("contrastive+ctc+sdtw", "contrastive+ctc", "text2speech_r1", "higher"),
             ("contrastive+ctc+sdtw", "contrastive+ctc", "wer", "lower")]
TARGETS = [("speech2text_r1", 0.9, "higher"), ("text2speech_r1", 0.9, "higher"), ("wer", 0.3, "lower")]
# the claim table decided under the protocol (paired over shared seeds, Holm across its rows): the targets
# of the CTC recipe on test, and whether each consistency term run helps it on test
CLAIM_BASE = "contrastive+ctc"
# what must agree before --merge joins earlier seeds to this run's
RECIPE = ("data_seed", "num_train", "num_test", "num_val", "steps", "batch_size", "d_model", "speech_layers", "text_layers",
          "shared_layers", "block", "lr")


def table(rows: list[dict]) -> str:
    """One line per arm: each metric as mean ± 95% interval over the seeds run (``benchstats.cell``)."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    head = f"{'arm':<24}" + "".join(f"{label:>17}" for _, label in COLUMNS) + f"{'s/step':>9}"
    lines = [head, "-" * len(head)]
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        cells = "".join(f"{cell([r[k] for r in rs], 3):>17}" if k in rs[0] else f"{'-':>17}" for k, _ in COLUMNS)
        lines.append(f"{arm:<24}{cells}{sum(r['seconds_per_step'] for r in rs) / len(rs):>9.2f}")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> dict:
    """Descriptive: Welch's tests between arms (QUESTIONS, test and val) and the targets (TARGETS) per arm,
    uncorrected. The verdicts reported under the protocol come from ``claims``."""
    by = {}
    for r in rows:
        by.setdefault(r["arm"], []).append(r)
    out = {"comparisons": {}, "targets": {}}
    for a, b, base, better in QUESTIONS:
        for metric in (base, "val_" + base):  # the val split too, where the data has one
            if a in by and b in by and metric in by[a][0] and metric in by[b][0]:
                c = compare([r[metric] for r in by[a]], [r[metric] for r in by[b]])
                out["comparisons"][f"{a} vs {b}: {metric}"] = {
                    "diff": c.diff, "p": c.p_value, "significant": c.significant,
                    "verdict": c.verdict(better, names=(a, b))}
    for arm, rs in by.items():
        for metric, target, better in TARGETS:
            if metric in rs[0]:
                out["targets"][f"{arm}: {metric} {'>=' if better == 'higher' else '<='} {target}"] = \
                    against([r[metric] for r in rs], target, better)
    return out


def claims(rows: list[dict]) -> list[dict]:
    """The protocol's claim table: targets of the CTC arm and each consistency arm against it, on the test
    split, paired over the seeds both arms ran (a seed missing from one arm stops it), Holm over the rows."""
    by: dict = {}
    for r in rows:
        by.setdefault(r["arm"], {})[r["seed"]] = r
    if CLAIM_BASE not in by:
        return []
    base = by[CLAIM_BASE]
    seeds = sorted(base)
    t = ClaimTable()
    for metric, target, better in TARGETS:
        t.target(f"{CLAIM_BASE}: test {metric} {'>=' if better == 'higher' else '<='} {target}",
                 [base[s][metric] for s in seeds], target, better)
    for a, b, metric, better in QUESTIONS:
        if b != CLAIM_BASE or a not in by:
            continue
        if sorted(by[a]) != seeds:
            raise SystemExit(f"arm {a} ran seeds {sorted(by[a])} but {CLAIM_BASE} ran {seeds}: run the same seeds "
                             "for both (--seeds) so the comparison is paired")
        t.better(f"{a} beats {b}: test {metric}", [by[a][s][metric] for s in seeds],
                 [base[s][metric] for s in seeds], higher_is_better=better == "higher", paired=True)
    return t.print("claims (test split, paired, Holm)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.environ.get("MMALIGN_DATA", "data"), "spoken"),
                   help="spoken dataset folder (generated there if missing)")
    p.add_argument("--num-train", type=int, default=600, help="training clips when generating")
    p.add_argument("--num-test", type=int, default=100, help="held-out-voice/text clips when generating")
    p.add_argument("--num-val", type=int, default=0,
                   help="validation clips when generating (own held-out voices and texts; 0: no val split)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the generated data (voices, texts, split) when generating; a new seed is a fresh draw")
    p.add_argument("--arms", default="contrastive,contrastive+ctc,contrastive+ctc+dtw",
                   help=f"comma-separated subset of {list(ARMS)}")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per arm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--d-model", type=int, default=96)
    p.add_argument("--speech-layers", type=int, default=2)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--shared-layers", type=int, default=0, help="upper blocks shared by both modalities (joint encoder)")
    p.add_argument("--block", choices=("conformer", "transformer"), default="conformer")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model / data-order seeds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="outputs/bench/speech.json", help="JSON output path")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="earlier outputs whose (seed, arm) rows join this run; those runs are not repeated")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = ensure_data(args.data, args.num_train, args.num_test, seed=args.data_seed, num_val=args.num_val)  # one dataset; seeds vary the runs
    print(f"data {args.data}: {info['splits']}", flush=True)
    rows = load_rows(args.merge, "rows", match={k: getattr(args, k) for k in RECIPE})
    done = {(r["seed"], r["arm"]) for r in rows}
    for seed in args.seeds:
        for name in arms:
            if (seed, name) in done:
                continue
            args.seed = seed
            rows.append({"seed": seed, **run_arm(name, args, args.data)})
            print(f"{name}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'weights'})}", flush=True)
            if args.out:
                save(args.out + ".partial", {"config": vars(args), "rows": rows})
    print(f"\nmean ± 95% interval over seeds {sorted({r['seed'] for r in rows})}")
    print(table(rows))
    v = verdicts(rows)
    for k, c in v["comparisons"].items():
        print(f"  {k}: {c['diff']:+.3f}, {c['verdict']}")
    for k, t in v["targets"].items():
        print(f"  target {k}: {t.verdict}")
    result = {"config": vars(args), "data": info.get("splits"), "rows": rows, **v, "claims": claims(rows)}
    if args.out:
        save(args.out, result)
    return result


if __name__ == "__main__":
    main()
