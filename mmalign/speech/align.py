"""CTC forced alignment (Viterbi over the CTC trellis) and word onsets from it, in plain torch.

For targets ``y_1..y_U`` the CTC trellis has ``S = 2U + 1`` states ``blank, y_1, blank, ..., y_U,
blank``. A path moves from state ``s`` at frame ``t-1`` to ``s`` (stay), ``s + 1`` (next) or
``s + 2`` (skip a blank, only between two *different* labels) at frame ``t``; it starts in state 0
or 1 and ends in ``S-1`` or ``S-2``. Viterbi keeps the best log-probability per state (max instead
of the CTC loss's logsumexp) and a back-pointer, one vectorised step per frame for the whole batch.

The onset of a word is the first frame whose state is its first character; every label state is
visited by every valid path, so it always exists.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tokenizer import BLANK

_NEG = -1e30  # finite "impossible": -inf - (-inf) in the max would give NaN in the comparisons


def ctc_forced_align(
    log_probs: Tensor, input_lengths: Tensor, targets: Tensor, target_lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """Best CTC path per utterance.

    Args:
        log_probs: ``(B, T, V)`` log-softmax outputs (blank = 0).
        input_lengths: ``(B,)`` valid frames.
        targets: ``(B, U)`` label ids (> 0), padded with anything past ``target_lengths``.
        target_lengths: ``(B,)`` valid labels (>= 1).

    Returns:
        ``states (B, T)``: trellis state per frame (``-1`` on padding frames); the label index of an
        odd state ``s`` is ``(s - 1) // 2``, even states are blanks. ``feasible (B,)``: False where
        the clip has too few frames for its transcript (then ``states`` is meaningless).
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (B, T, V), got {tuple(log_probs.shape)}")
    B, T, _ = log_probs.shape
    dev = log_probs.device
    lp = log_probs.detach().float()
    tl, il = target_lengths.to(dev).long(), input_lengths.to(dev).long()
    if int(tl.min()) < 1 or int(il.min()) < 1 or int(il.max()) > T:
        raise ValueError(f"need target_lengths >= 1 and input_lengths in [1, {T}], got {tl.tolist()} / {il.tolist()}")
    U = targets.shape[1]
    S = 2 * U + 1
    ext = torch.full((B, S), BLANK, dtype=torch.long, device=dev)
    ext[:, 1::2] = targets.to(dev).long()
    s_idx = torch.arange(S, device=dev)
    valid_state = s_idx[None, :] < (2 * tl + 1)[:, None]
    # Skip s-2 -> s allowed only into a label that differs from the label two states back.
    can_skip = torch.zeros(B, S, dtype=torch.bool, device=dev)
    can_skip[:, 2:] = (ext[:, 2:] != BLANK) & (ext[:, 2:] != ext[:, :-2])
    emit = lp.gather(2, ext[:, None, :].expand(B, T, S))  # (B, T, S)

    alpha = torch.full((B, S), _NEG, device=dev)
    alpha[:, 0] = emit[:, 0, 0]
    alpha[:, 1] = emit[:, 0, 1]  # S >= 3 since every target has a label
    alpha = alpha.masked_fill(~valid_state, _NEG)
    back = torch.zeros(B, T, S, dtype=torch.long, device=dev)
    neg = torch.full((B, 1), _NEG, device=dev)
    for t in range(1, T):
        stay, step = alpha, torch.cat([neg, alpha[:, :-1]], 1)
        skip = torch.cat([neg, neg, alpha[:, :-2]], 1).masked_fill(~can_skip, _NEG)
        cand = torch.stack([stay, step, skip], -1)  # back-pointer = how many states we moved
        best, arg = cand.max(-1)
        new = (best + emit[:, t]).masked_fill(~valid_state, _NEG)
        live = (t < il)[:, None]
        alpha = torch.where(live, new, alpha)
        back[:, t] = torch.where(live, arg, 0)

    b = torch.arange(B, device=dev)
    last, second = 2 * tl, 2 * tl - 1
    end_last, end_second = alpha[b, last], alpha[b, second]
    s = torch.where(end_last >= end_second, last, second)
    feasible = torch.maximum(end_last, end_second) > _NEG / 2
    states = torch.full((B, T), -1, dtype=torch.long, device=dev)
    for t in range(T - 1, -1, -1):
        active = t < il
        states[:, t] = torch.where(active, s, states[:, t])
        move = back[b, t, s]
        s = torch.where(active & (t > 0), s - move, s)
    return states, feasible


def word_char_starts(text: str) -> list[int]:
    """Character index where each space-separated word of a normalised transcript starts."""
    starts, prev_space = [], True
    for i, c in enumerate(text):
        if c != " " and prev_space:
            starts.append(i)
        prev_space = c == " "
    return starts


def word_onset_frames(states: Tensor, length: int, text: str) -> list[int]:
    """First frame of each word's first character, from one utterance's ``states`` (``(T,)``)."""
    path = states[:length].tolist()
    first: dict[int, int] = {}
    for frame, s in enumerate(path):
        if s % 2 == 1:
            first.setdefault((s - 1) // 2, frame)
    out = []
    for c in word_char_starts(text):
        if c not in first:
            raise ValueError(f"character {c} of {text!r} never appears on the alignment path; was the path feasible?")
        out.append(first[c])
    return out


def proportional_onsets(text: str, duration: float) -> list[float]:
    """Baseline: word onsets at ``duration * char_index / len(text)`` (speech spread evenly over the text)."""
    return [duration * c / max(len(text), 1) for c in word_char_starts(text)]
