"""``spoken``: words, digit strings and short sentences spoken by espeak-ng, with word onsets.

Splits: ``train``; ``test`` with held-out voices AND held-out texts; optionally ``val``, a
validation split with its own held-out voices AND texts (carved from the training side, disjoint
from both train and test: choose recipes on it, report on ``test``), and ``test_seen_voice``
(training voices, the test texts). Each sample holds ``.flac`` (16 kHz,
16-bit), ``.txt`` (transcript) and ``.json`` (voice, speed, pitch, words, onsets in seconds,
duration, kind, split). Clips failing ``check_clip`` or onset matching are skipped and counted in
``info.json``. Needs espeak-ng (Debian/Ubuntu package: ``apt-get install -y espeak-ng``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .espeak import ALL_VOICES, SynthError, synthesize

WORDS = (
    "apple water house green music river table window yellow garden happy orange paper summer "
    "winter morning dinner friend money number people school family story animal letter mother "
    "father doctor city flower forest mountain ocean island planet rocket silver purple monkey "
    "tiger rabbit pencil button candle basket bottle camera guitar pillow shadow thunder kitten "
    "dragon engine ladder mirror rainbow blanket coffee"
).split()
DIGITS = "zero one two three four five six seven eight nine".split()
_ADJ = "red big small old new quiet bright cold warm soft".split()
_NOUN = "box car dog cat book chair lamp cup bag key hat boat".split()
# No "on the" / "in the": espeak speaks such pairs as one word and emits one WORD event for both.
_PLACE = ("under the bed", "near the door", "by the window", "behind the house", "beside the tree")
_TEMPLATES = ("the {a} {n} is {p}", "please put the {a} {n} {p}", "i can see a {a} {n}", "where is the {a} {n}")
TEXT_KINDS = ("word", "digits", "sentence")
SPLIT_NAMES = ("train", "test", "test_seen_voice", "val")  # order fixes each split's RNG stream


def text_pool(seed: int = 0, num_digit_strings: int = 300) -> dict[str, list[str]]:
    """All candidate texts by kind: the 60 words, random 3-4 digit strings, every template fill."""
    rng = np.random.default_rng([seed, 1])
    digits: set[str] = set()
    while len(digits) < num_digit_strings:
        digits.add(" ".join(DIGITS[d] for d in rng.integers(0, 10, size=int(rng.integers(3, 5)))))
    sentences = [t.format(a=a, n=n, p=p) for t in _TEMPLATES for a in _ADJ for n in _NOUN for p in _PLACE]
    return {"word": list(WORDS), "digits": sorted(digits), "sentence": sorted(set(sentences))}


def split_items(items: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic disjoint (train, test) split of ``items`` (at least one item on each side)."""
    if not 0.0 < test_fraction < 1.0 or len(items) < 2:
        raise ValueError(f"need 0 < test_fraction < 1 and >= 2 items, got {test_fraction} and {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_test = min(len(items) - 1, max(1, round(test_fraction * len(items))))
    test = sorted(items[i] for i in order[:n_test])
    return sorted(items[i] for i in order[n_test:]), test


@dataclass
class SpokenSplits:
    """Voices and texts per split. ``test`` uses only held-out voices AND held-out texts;
    ``val`` (when carved) likewise with voices and texts of its own; ``test_seen_voice`` pairs
    training voices with the test texts (text generalisation only)."""

    train_voices: list[str]
    test_voices: list[str]
    train_texts: dict[str, list[str]]
    test_texts: dict[str, list[str]]
    val_voices: list[str] = field(default_factory=list)
    val_texts: dict[str, list[str]] = field(default_factory=dict)

    def plan(self, split: str) -> tuple[list[str], dict[str, list[str]]]:
        if split == "val" and not self.val_voices:
            raise ValueError("no val split was carved: make_splits(val_fraction > 0)")
        return {
            "train": (self.train_voices, self.train_texts),
            "test": (self.test_voices, self.test_texts),
            "test_seen_voice": (self.train_voices, self.test_texts),
            "val": (self.val_voices, self.val_texts),
        }[split]


def make_splits(seed: int = 0, test_fraction: float = 0.2, voices: tuple[str, ...] = ALL_VOICES,
                val_fraction: float = 0.0) -> SpokenSplits:
    """Hold out ``test_fraction`` of the voices and of each kind's texts, deterministically; with
    ``val_fraction > 0`` hold out that fraction of the *remaining* voices and texts for ``val``.

    The test partition does not depend on ``val_fraction``: the same seed gives the same test
    voices and texts with or without a val split (only the training side shrinks). A voice is an
    accent+variant pair: a held-out pair may share its accent or its variant with training pairs,
    but never both. Held-out texts are whole strings (digit strings and sentences reuse the
    training vocabulary; the 60 single words are disjoint as words).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    pool = text_pool(seed)
    train_v, test_v = split_items(list(voices), test_fraction, seed)
    tr, te, va = {}, {}, {}
    for k, kind in enumerate(TEXT_KINDS):
        tr[kind], te[kind] = split_items(pool[kind], test_fraction, seed + 1000 * (k + 1))
    val_v: list[str] = []
    if val_fraction > 0:
        train_v, val_v = split_items(train_v, val_fraction, seed + 7)
        for k, kind in enumerate(TEXT_KINDS):
            tr[kind], va[kind] = split_items(tr[kind], val_fraction, seed + 7 + 1000 * (k + 1))
    return SpokenSplits(train_v, test_v, tr, te, val_v, va)


def spoken_samples(split: str, num_samples: int, splits: SpokenSplits, stats: dict, seed: int = 0,
                   sample_rate: int = 16000, speed_range: tuple[int, int] = (130, 200),
                   pitch_range: tuple[int, int] = (30, 70), max_seconds: float = 10.0) -> Iterator[dict]:
    """``num_samples`` clips of ``split`` as webdataset samples; ``stats`` collects skipped clips and
    onset sources.

    Each sample: text kind uniform over ``TEXT_KINDS``, text and voice uniform within the split,
    speed (wpm) and pitch uniform over the inclusive ranges.
    """
    import soundfile as sf

    from ..audio import BadClipError, check_clip

    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    voices, texts = splits.plan(split)
    rng = np.random.default_rng([seed, 7, SPLIT_NAMES.index(split)])
    skipped, sources = stats.setdefault("skipped", {}), stats.setdefault("onset_source", {})
    written = attempts = 0
    while written < num_samples:
        attempts += 1
        if attempts > 2 * num_samples + 20:
            raise SynthError(f"{split}: too many failed clips ({skipped}); check the espeak-ng install")
        kind = TEXT_KINDS[int(rng.integers(len(TEXT_KINDS)))]
        text = texts[kind][int(rng.integers(len(texts[kind])))]
        voice = voices[int(rng.integers(len(voices)))]
        speed = int(rng.integers(speed_range[0], speed_range[1] + 1))
        pitch = int(rng.integers(pitch_range[0], pitch_range[1] + 1))
        try:
            utt = synthesize(text, voice, speed, pitch, sample_rate)
            check_clip(utt.wave, sample_rate, max_seconds)
        except (BadClipError, SynthError) as e:
            reason = getattr(e, "reason", "synth_error")
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        buf = io.BytesIO()
        sf.write(buf, utt.wave, sample_rate, format="FLAC", subtype="PCM_16")
        meta = utt.metadata() | {"kind": kind, "split": split}
        sources[utt.onset_source] = sources.get(utt.onset_source, 0) + 1
        yield {"__key__": f"{split}-{written:06d}", "flac": buf.getvalue(), "txt": text.encode("utf-8"),
               "json": json.dumps(meta).encode("utf-8")}
        written += 1


def generate(root: str, seed: int = 0, num_train: int = 600, num_test: int = 100, num_seen_voice: int = 0,
             num_val: int = 0, shard_size: int = 100, sample_rate: int = 16000, test_fraction: float = 0.2,
             val_fraction: float = 0.1, max_seconds: float = 10.0) -> dict:
    """Write ``root/<split>/<split>-NNNNNN.tar`` + ``sizes.json`` per split; returns the info dict.

    ``num_val > 0`` carves the ``val`` split (``val_fraction`` of the non-test voices and texts);
    with ``num_val = 0`` training keeps every non-test voice and text."""
    from ..shards import write_shards

    if num_val < 0:
        raise ValueError(f"num_val must be >= 0, got {num_val}")
    splits = make_splits(seed, test_fraction, val_fraction=val_fraction if num_val else 0.0)
    counts = {"train": num_train, "test": num_test, "test_seen_voice": num_seen_voice, "val": num_val}
    info: dict = {"splits": {}, "seed": seed, "sample_rate": sample_rate, "skipped": {}, "onset_source": {}}
    for split, n in counts.items():
        if n <= 0:
            continue
        stats: dict = {}
        sizes = write_shards(os.path.join(root, split), spoken_samples(split, n, splits, stats, seed, sample_rate,
                                                                      max_seconds=max_seconds), shard_size, split)
        info["splits"][split] = sum(sizes.values())
        info["skipped"][split] = stats.get("skipped", {})
        info["onset_source"][split] = stats.get("onset_source", {})
    info["voices"] = {"train": splits.train_voices, "test": splits.test_voices}
    if splits.val_voices:
        info["voices"]["val"] = splits.val_voices
    return info
