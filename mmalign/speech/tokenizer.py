"""Character vocabulary for transcripts: text encoder input and CTC output share it.

Id 0 is reserved: it pads token batches (the text encoder masks it) and is the CTC blank (a CTC
target never contains it). Characters are ids ``1..len(alphabet)``, so ``vocab_size`` (the CTC
head width and the embedding table size) is ``len(alphabet) + 1``.

Transcripts are lower-cased and runs of whitespace become one space before lookup; any other
character outside the alphabet raises :class:`OutOfVocabularyError` naming it. The data pipeline
calls :meth:`CharTokenizer.validate` per sample so a stream skips and counts such clips instead of
failing a whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_ALPHABET = " abcdefghijklmnopqrstuvwxyz'"
PAD = BLANK = 0


class OutOfVocabularyError(ValueError):
    """A transcript holds characters the tokenizer cannot encode (the clip is skipped and counted)."""

    def __init__(self, text: str, bad: Sequence[str], alphabet: str) -> None:
        self.text, self.bad = text, sorted(set(bad))
        shown = text if len(text) <= 60 else text[:57] + "..."
        super().__init__(
            f"transcript {shown!r} has character(s) {self.bad} outside the vocabulary {alphabet!r}; "
            "normalise the transcripts (spell out digits, drop punctuation) or extend the tokenizer's alphabet"
        )


class CharTokenizer:
    """Transcript <-> character ids.

    Args:
        alphabet: the characters, in id order starting at 1 (must include the space).
        max_length: longest transcript accepted, in characters after normalisation (``None``: any).
            Longer ones raise ``ValueError``; truncating would silently misalign CTC targets.
    """

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, max_length: int | None = 200) -> None:
        if len(set(alphabet)) != len(alphabet) or " " not in alphabet:
            raise ValueError(f"alphabet must hold unique characters including ' ', got {alphabet!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        self.alphabet, self.max_length = alphabet, max_length
        self._ids = {c: i + 1 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1

    @staticmethod
    def normalize(text: str) -> str:
        return " ".join(text.lower().split())

    def validate(self, text: str) -> str:
        """Normalised ``text``; raises :class:`OutOfVocabularyError` or ``ValueError`` (empty / too long)."""
        norm = self.normalize(text)
        if not norm:
            raise ValueError("empty transcript: nothing to align the clip with")
        bad = [c for c in norm if c not in self._ids]
        if bad:
            raise OutOfVocabularyError(text, bad, self.alphabet)
        if self.max_length is not None and len(norm) > self.max_length:
            raise ValueError(f"transcript of {len(norm)} characters is longer than max_length={self.max_length}; "
                             "raise the tokenizer's max_length")
        return norm

    def encode(self, text: str) -> list[int]:
        return [self._ids[c] for c in self.validate(text)]

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """``(B, L)`` int64 ids right-padded with 0 (``L`` = longest transcript of the batch)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = [self.encode(t) for t in texts]
        out = torch.zeros(len(ids), max((len(i) for i in ids), default=0), dtype=torch.long)
        for row, seq in enumerate(ids):
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text; 0 (pad/blank) is dropped. Does not collapse repeats (see ``greedy_ctc_decode``)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.alphabet[i - 1] for i in ids if 0 < i <= len(self.alphabet))

    @staticmethod
    def lengths(tokens: torch.Tensor) -> torch.Tensor:
        """Valid ids per row of a padded ``(B, L)`` batch (0 never encodes a character)."""
        return (tokens != PAD).sum(1)

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r}, max_length={self.max_length})"
