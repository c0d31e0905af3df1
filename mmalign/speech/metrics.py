"""Speech evaluation pieces: greedy CTC decoding, transcript ids, word-onset error.

WER/CER themselves are torchmetrics' ``WordErrorRate`` / ``CharErrorRate`` on the decoded strings;
retrieval and geometry are ``mmalign.evaluation``'s evaluators with transcript ids as the grouping
key (several clips of one transcript are all correct answers).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from .tokenizer import BLANK, CharTokenizer


def transcript_id(text: str) -> int:
    """Stable int64 id of a normalised transcript, equal on every rank and in every process.

    Python's ``hash`` is salted per process, so ranks would disagree; 63 bits of blake2b make a
    collision between two transcripts of one batch or evaluation set practically impossible.
    """
    digest = hashlib.blake2b(CharTokenizer.normalize(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def transcript_ids(texts: list[str], device: torch.device | str = "cpu") -> Tensor:
    return torch.tensor([transcript_id(t) for t in texts], dtype=torch.long, device=device)


def greedy_ctc_decode(logits: Tensor, lengths: Tensor, tokenizer: CharTokenizer) -> list[str]:
    """Best label per frame, repeats collapsed, blanks dropped, spaces normalised."""
    best = logits.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lengths.cpu().tolist()):
        ids = torch.unique_consecutive(row[:n])
        out.append(" ".join(tokenizer.decode(ids[ids != BLANK]).split()))
    return out


class OnsetError(Metric):
    """Mean absolute word-onset error in milliseconds, of the model and of a baseline.

    ``update(pred, target, baseline)``: onsets in seconds, one entry per word (any number of
    clips flattened together). ``compute()`` returns ``onset_error_ms``, ``onset_baseline_ms`` and
    ``onset_within_50ms`` (fraction of words whose predicted onset is within 50 ms).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, tolerance_ms: float = 50.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tolerance_ms = float(tolerance_ms)
        for name in ("error_sum", "baseline_sum", "within"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, baseline: Tensor) -> None:
        if not pred.shape == target.shape == baseline.shape or pred.dim() != 1:
            raise ValueError(f"pred, target and baseline must be equal 1-D (words,), got {tuple(pred.shape)}, "
                             f"{tuple(target.shape)}, {tuple(baseline.shape)}")
        err = (pred.double() - target.double()).abs() * 1000.0
        self.error_sum += err.sum()
        self.baseline_sum += ((baseline.double() - target.double()).abs() * 1000.0).sum()
        self.within += (err <= self.tolerance_ms).sum().double()
        self.count += pred.numel()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp(min=1).double()
        return {"onset_error_ms": (self.error_sum / n).float(), "onset_baseline_ms": (self.baseline_sum / n).float(),
                f"onset_within_{self.tolerance_ms:g}ms": (self.within / n).float()}
