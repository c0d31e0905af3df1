"""EDA text augmentation (Wei and Zou 2019, "EDA: Easy Data Augmentation Techniques"): synonym
replacement, random insertion, random swap and random deletion on whitespace-separated words.

The "improved CLIP baselines" recipe augments training captions this way. Per caption, with
probability ``prob``, ONE of the enabled operations (rate > 0) is drawn uniformly and applied with its
rate ``alpha`` (the paper's one-operation-per-augmented-copy), where for a caption of L words:

- synonym: ``n = max(1, round(alpha * L))`` distinct words that have synonyms are replaced by one;
- insert:  ``n`` times, a synonym of a random word (that has one) is inserted at a random position;
- swap:    ``n`` times, two random positions swap their words;
- delete:  each word is dropped with probability ``alpha``; at least one word survives.

Plain Python, no downloads: the synonym table is ``SHAPES_SYNONYMS`` (the vocabulary of the generated
``shapes`` captions) merged with an optional user JSON file ``{"word": ["synonym", ...]}``. The caller
passes the ``random.Random`` to use: the datamodule seeds it per sample (``datamodules.stream``), so a
caption's augmentation is reproducible and survives resume.
"""

from __future__ import annotations

import json
import os
import random
import string

#: groups of interchangeable words in the shapes captions (each word's synonyms are the rest of its
#: group). Colour and shape names keep their meaning: a synonym never changes what the caption says.
_SHAPES_GROUPS = (
    ("picture", "image", "photo"), ("large", "big"), ("small", "little", "tiny"), ("center", "middle", "centre"),
    ("coloured", "colored"), ("background", "backdrop"), ("gray", "grey"), ("purple", "violet"),
    ("top", "upper"), ("bottom", "lower"), ("circle", "disc"), ("cross", "plus"), ("with", "showing"),
    ("there", "here"),
)
SHAPES_SYNONYMS: dict[str, list[str]] = {w: [o for o in g if o != w] for g in _SHAPES_GROUPS for w in g}

OPERATIONS = ("synonym", "insert", "swap", "delete")


def load_synonyms(path: str | None, builtin: bool = True) -> dict[str, list[str]]:
    """The built-in table (``builtin``) with the JSON file at ``path`` merged over it (a word the file
    lists replaces the built-in entry). One clear ``ValueError`` for a missing or malformed file."""
    table = dict(SHAPES_SYNONYMS) if builtin else {}
    if path is None:
        return table
    if not os.path.isfile(path):
        raise ValueError(f"caption.augment.synonyms: '{path}' does not exist; give a JSON file mapping each word "
                         'to a list of synonyms, e.g. {"big": ["large"]}.')
    try:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"caption.augment.synonyms: '{path}' is not valid UTF-8 JSON ({exc}).") from None
    ok = isinstance(user, dict) and all(
        isinstance(k, str) and k.strip() and isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v)
        for k, v in user.items())
    if not ok:
        raise ValueError(f"caption.augment.synonyms: '{path}' must map each word to a non-empty list of "
                         'non-empty strings, e.g. {"big": ["large"]}.')
    table.update({k.lower(): list(v) for k, v in user.items()})
    return table


def _split_word(token: str) -> tuple[str, str, str]:
    """``"Center:"`` -> ("", "center", ":"): the lookup key without case or surrounding punctuation."""
    core = token.strip(string.punctuation)
    if not core:
        return token, "", ""
    start = token.index(core)
    return token[:start], core.lower(), token[start + len(core):]


def _with_case(replacement: str, original: str) -> str:
    return replacement[0].upper() + replacement[1:] if original[:1].isupper() else replacement


def synonym_replace(words: list[str], n: int, table: dict[str, list[str]], rng: random.Random) -> list[str]:
    out = list(words)
    candidates = [i for i, w in enumerate(words) if _split_word(w)[1] in table]
    rng.shuffle(candidates)
    for i in candidates[:n]:
        pre, key, post = _split_word(out[i])
        core = out[i][len(pre):len(out[i]) - len(post)]
        out[i] = pre + _with_case(rng.choice(table[key]), core) + post
    return out


def random_insert(words: list[str], n: int, table: dict[str, list[str]], rng: random.Random) -> list[str]:
    out = list(words)
    for _ in range(n):
        keys = [k for k in (_split_word(w)[1] for w in out) if k in table]
        if not keys:  # nothing has a synonym: EDA inserts nothing
            break
        out.insert(rng.randint(0, len(out)), rng.choice(table[rng.choice(keys)]))
    return out


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_delete(words: list[str], p: float, rng: random.Random) -> list[str]:
    kept = [w for w in words if rng.random() >= p]
    return kept if kept else [rng.choice(words)]  # an empty caption would be skipped as corrupt


class TextAugment:
    """EDA on one caption at a time (see the module docstring).

    Args:
        synonym, insert, swap, delete: Rate ``alpha`` of each operation in [0, 1]; 0 disables it.
        prob: Probability that a caption is augmented at all (else it is returned unchanged).
        synonyms: The word -> synonyms table (``load_synonyms``).
    """

    def __init__(self, synonym: float = 0.0, insert: float = 0.0, swap: float = 0.0, delete: float = 0.0,
                 prob: float = 1.0, synonyms: dict[str, list[str]] | None = None) -> None:
        rates = {"synonym": synonym, "insert": insert, "swap": swap, "delete": delete, "prob": prob}
        for name, value in rates.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TextAugment: {name} must be in [0, 1], got {value!r}")
        self.rates = {k: float(v) for k, v in rates.items() if k != "prob"}
        self.prob = float(prob)
        self.table = SHAPES_SYNONYMS if synonyms is None else synonyms
        self.enabled = [op for op in OPERATIONS if self.rates[op] > 0]

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        if not self.enabled or not words or rng.random() >= self.prob:
            return text
        op = rng.choice(self.enabled)
        alpha = self.rates[op]
        n = max(1, round(alpha * len(words)))
        if op == "synonym":
            words = synonym_replace(words, n, self.table, rng)
        elif op == "insert":
            words = random_insert(words, n, self.table, rng)
        elif op == "swap":
            words = random_swap(words, n, rng)
        else:
            words = random_delete(words, alpha, rng)
        return " ".join(words)
