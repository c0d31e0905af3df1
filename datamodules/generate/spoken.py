"""``spoken``: words, digit strings and short sentences spoken by espeak-ng, with word onsets.

Splits (see ``mmalign.speech.synth``): ``train``; ``test`` with held-out voices AND held-out
texts; optionally ``test_seen_voice`` (training voices, held-out texts). Each sample holds
``.flac`` (16 kHz, 16-bit), ``.txt`` (transcript) and ``.json`` (voice, speed, pitch, words,
onsets in seconds, duration). Needs espeak-ng (Debian/Ubuntu package: ``apt-get install -y espeak-ng``).
"""

from __future__ import annotations

import json
import os


def generate(root: str, seed: int = 0, num_train: int = 600, num_test: int = 100, num_seen_voice: int = 0,
             shard_size: int = 100, sample_rate: int = 16000, test_fraction: float = 0.2,
             max_seconds: float = 10.0) -> dict:
    """Write ``root/<split>/<split>-NNNNNN.tar`` + ``sizes.json`` per split; returns the info dict."""
    from mmalign.speech import synth

    splits = synth.make_splits(seed, test_fraction)
    counts = {"train": num_train, "test": num_test, "test_seen_voice": num_seen_voice}
    info: dict = {"splits": {}, "seed": seed, "sample_rate": sample_rate, "skipped": {}, "onset_source": {}}
    for split, n in counts.items():
        if n <= 0:
            continue
        out_dir = os.path.join(root, split)
        entry = synth.write_split(out_dir, split, n, splits, seed=seed, shard_size=shard_size,
                                  sample_rate=sample_rate, max_seconds=max_seconds)
        sizes = {name: min(shard_size, entry["num_samples"] - i * shard_size) for i, name in enumerate(entry["shards"])}
        with open(os.path.join(out_dir, "sizes.json"), "w") as f:
            json.dump(sizes, f, indent=1)
        info["splits"][split] = entry["num_samples"]
        info["skipped"][split] = entry["skipped"]
        info["onset_source"][split] = entry["onset_source"]
    info["voices"] = {"train": splits.train_voices, "test": splits.test_voices}
    return info
