#!/usr/bin/env python
"""Synthesise the spoken words/digits/sentences dataset with espeak-ng into webdataset shards.

    python scripts/make_spoken.py --out data/spoken --num-train 200 --num-test 50

Writes ``{out}/train-*.tar``, ``{out}/test-*.tar`` (held-out voices AND held-out texts),
optionally ``{out}/test_seen_voice-*.tar`` (training voices, held-out texts) and
``{out}/manifest.json`` describing voices, texts, shards, skipped clips and onset sources.
Needs ``apt-get install -y espeak-ng``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mmalign.speech import synth  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--num-train", type=int, default=200, help="training clips")
    p.add_argument("--num-test", type=int, default=50, help="unseen-voice, unseen-text test clips")
    p.add_argument("--num-seen-voice", type=int, default=25, help="seen-voice, unseen-text clips (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="fixes the voice/text split and every sample")
    p.add_argument("--shard-size", type=int, default=100, help="samples per .tar shard")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of voices and of texts held out")
    p.add_argument("--sample-rate", type=int, default=16000, help="output rate in Hz")
    args = p.parse_args(argv)
    for name in ("num_train", "num_test", "num_seen_voice"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.shard_size < 1:
        p.error("--shard-size must be >= 1")

    t0 = time.perf_counter()
    splits = synth.make_splits(args.seed, args.test_fraction)
    manifest = {
        "seed": args.seed,
        "sample_rate": args.sample_rate,
        "test_fraction": args.test_fraction,
        "splits": {},
    }
    counts = {"train": args.num_train, "test": args.num_test, "test_seen_voice": args.num_seen_voice}
    for split, n in counts.items():
        if n == 0:
            continue
        t = time.perf_counter()
        entry = synth.write_split(args.out, split, n, splits, seed=args.seed, shard_size=args.shard_size,
                                  sample_rate=args.sample_rate)
        entry["seconds"] = round(time.perf_counter() - t, 2)
        manifest["splits"][split] = entry
        print(f"{split}: {entry['num_samples']} clips in {len(entry['shards'])} shards, "
              f"skipped {entry['skipped'] or 0}, onsets {entry['onset_source']}, {entry['seconds']} s")
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'manifest.json')} in {manifest['seconds']} s")
    return manifest


if __name__ == "__main__":
    try:
        main()
    except synth.EspeakUnavailableError as e:
        sys.exit(f"error: {e}")
