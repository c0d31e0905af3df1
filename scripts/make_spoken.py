#!/usr/bin/env python
"""Synthesise the ``spoken`` dataset (words, digit strings, sentences by espeak-ng) into shards.

    python scripts/make_spoken.py --out data/spoken --num-train 600 --num-test 100

Writes exactly what ``generate: spoken`` writes on first use: ``{out}/<split>/<split>-NNNNNN.tar``
with a ``sizes.json`` per split (``train``; ``test`` with held-out voices AND held-out texts;
``val`` with its own held-out voices and texts, on request; ``test_seen_voice`` with training voices
and the test texts) and ``{out}/info.json`` (voices,
sample counts, skipped clips, onset sources). Needs ``apt-get install -y espeak-ng``.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset folder (must not exist yet, or hold this dataset)")
    p.add_argument("--num-train", type=int, default=600, help="training clips")
    p.add_argument("--num-test", type=int, default=100, help="unseen-voice, unseen-text test clips")
    p.add_argument("--num-val", type=int, default=0,
                   help="validation clips: voices and texts held out from both train and test (0: no val split)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the non-test voices/texts for val")
    p.add_argument("--num-seen-voice", type=int, default=0, help="seen-voice, unseen-text clips (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="fixes the voice/text split and every sample")
    p.add_argument("--shard-size", type=int, default=100, help="samples per .tar shard")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of voices and of texts held out")
    p.add_argument("--sample-rate", type=int, default=16000, help="output rate in Hz")
    args = p.parse_args(argv)
    for name in ("num_train", "num_test", "num_val", "num_seen_voice"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")

    from datamodules.generate import generate_dataset

    t0 = time.perf_counter()
    info = generate_dataset("spoken", args.out, seed=args.seed, num_train=args.num_train, num_test=args.num_test,
                            num_seen_voice=args.num_seen_voice, num_val=args.num_val, shard_size=args.shard_size,
                            sample_rate=args.sample_rate, test_fraction=args.test_fraction,
                            val_fraction=args.val_fraction)
    for split, n in info["splits"].items():
        print(f"{split}: {n} clips, skipped {info['skipped'][split] or 0}, onsets {info['onset_source'][split]}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return info


if __name__ == "__main__":
    from datamodules.generate.espeak import EspeakUnavailableError

    try:
        main()
    except EspeakUnavailableError as e:
        sys.exit(f"error: {e}")
