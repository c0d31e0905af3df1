"""Character tokenizer, CTC forced alignment (against brute force), onsets, decoding, speech metrics."""

import itertools

import pytest
import torch

from mmalign.speech.align import ctc_forced_align, proportional_onsets, word_char_starts, word_onset_frames
from mmalign.speech.metrics import OnsetError, greedy_ctc_decode, transcript_id, transcript_ids
from mmalign.speech.tokenizer import CharTokenizer, OutOfVocabularyError


# ------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_roundtrip_padding_and_normalisation():
    tok = CharTokenizer()
    ids = tok(["Hello  World", "a"])
    assert ids.shape == (2, 11) and ids.dtype == torch.long
    assert ids[1, 1:].eq(0).all() and ids[0].ne(0).all()  # 0 only pads
    assert tok.decode(ids[0]) == "hello world"
    assert CharTokenizer.lengths(ids).tolist() == [11, 1]
    assert tok.vocab_size == len(tok.alphabet) + 1


def test_tokenizer_rejects_out_of_vocabulary_with_clear_message():
    tok = CharTokenizer()
    with pytest.raises(OutOfVocabularyError, match=r"\['4', '7'\].*spell out digits"):
        tok.validate("room 47")
    with pytest.raises(OutOfVocabularyError):
        tok(["fine", "café"])
    with pytest.raises(ValueError, match="empty transcript"):
        tok.validate("   ")
    with pytest.raises(ValueError, match="max_length"):
        CharTokenizer(max_length=5).validate("too long text")


# ------------------------------------------------------------------------------ forced alignment
def _collapse(path, blank=0):
    out, prev = [], None
    for p in path:
        if p != prev and p != blank:
            out.append(p)
        prev = p
    return out


def _brute_best(lp: torch.Tensor, target: list[int]) -> float:
    T, V = lp.shape
    best = -float("inf")
    for path in itertools.product(range(V), repeat=T):
        if _collapse(path) == target:
            best = max(best, float(sum(lp[t, p] for t, p in enumerate(path))))
    return best


def _path_score(lp, states, target):
    ext = [0]
    for c in target:
        ext += [c, 0]
    return float(sum(lp[t, ext[s]] for t, s in enumerate(states)))


@pytest.mark.parametrize("seed,target,T", [(0, [1, 2], 5), (1, [1, 1], 5), (2, [2, 1, 2], 6), (3, [1], 4)])
def test_forced_alignment_is_the_best_valid_path(seed, target, T):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(T, 3, generator=g), -1)
    states, feasible = ctc_forced_align(lp[None], torch.tensor([T]), torch.tensor([target]), torch.tensor([len(target)]))
    assert bool(feasible[0])
    s = states[0].tolist()
    ext = [0] + [x for c in target for x in (c, 0)]
    assert _collapse([ext[i] for i in s]) == target  # the path spells the target
    assert _path_score(lp, s, target) == pytest.approx(_brute_best(lp, target), abs=1e-5)


def test_forced_alignment_batch_with_padding_matches_single():
    g = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(torch.randn(2, 7, 4, generator=g), -1)
    targets = torch.tensor([[1, 3, 2], [2, 2, 0]])
    il, tl = torch.tensor([7, 5]), torch.tensor([3, 2])
    states, feasible = ctc_forced_align(lp, il, targets, tl)
    assert feasible.all()
    single, _ = ctc_forced_align(lp[1:, :5], il[1:], targets[1:, :2], tl[1:])
    assert states[1, :5].tolist() == single[0].tolist() and states[1, 5:].eq(-1).all()


def test_forced_alignment_flags_too_few_frames():
    lp = torch.log_softmax(torch.zeros(1, 2, 3), -1)
    _, feasible = ctc_forced_align(lp, torch.tensor([2]), torch.tensor([[1, 1]]), torch.tensor([2]))
    assert not bool(feasible[0])  # "aa" needs a blank between: 3 frames at least


def test_word_onsets_from_a_known_path():
    text = "ab c"  # words start at characters 0 and 3; states 2k+1 is character k
    # frames:   0 blank, 1-2 'a', 3 'b', 4 blank, 5 ' ', 6-7 'c', 8 blank
    states = torch.tensor([0, 1, 1, 3, 4, 5, 7, 7, 8])
    assert word_char_starts(text) == [0, 3]
    assert word_onset_frames(states, 9, text) == [1, 6]
    assert proportional_onsets(text, 2.0) == [0.0, 1.5]


def test_forced_alignment_finds_planted_onsets():
    # Log-probs that strongly favour a known frame path: alignment must recover its word onsets.
    tok = CharTokenizer()
    text = "hi yo"
    ids = tok.encode(text)
    # frames: 0-1 blank, 2 'h', 3 'i', 4 ' ', 5 blank, 6-7 'y', 8 'o', 9-10 blank
    path = [0, 0] + [ids[0], ids[1], ids[2], 0, ids[3], ids[3], ids[4], 0, 0]
    lp = torch.full((len(path), tok.vocab_size), -8.0)
    lp[torch.arange(len(path)), torch.tensor(path)] = 0.0
    states, ok = ctc_forced_align(lp[None], torch.tensor([len(path)]), torch.tensor([ids]), torch.tensor([len(ids)]))
    assert ok.all()
    assert word_onset_frames(states[0], len(path), text) == [2, 6]


# --------------------------------------------------------------------------------- decoding/metrics
def test_greedy_ctc_decode_collapses_repeats_and_blanks():
    tok = CharTokenizer()
    a, b, sp = tok.encode("a")[0], tok.encode("b")[0], tok.encode("a b")[1]
    seq = [0, a, a, 0, a, sp, sp, b, 0, 0]
    logits = torch.full((1, len(seq) + 2, tok.vocab_size), -5.0)
    logits[0, torch.arange(len(seq)), torch.tensor(seq)] = 5.0
    logits[0, len(seq):, b] = 5.0  # padding frames past the length must be ignored
    assert greedy_ctc_decode(logits, torch.tensor([len(seq)]), tok) == ["aa b"]


def test_transcript_ids_are_stable_and_normalised():
    assert transcript_id("The cat") == transcript_id("the  cat") != transcript_id("the dog")
    assert 0 <= transcript_id("x") < 2**63  # fits int64 on every rank
    ids = transcript_ids(["a b", "a  b", "c"])
    assert ids.dtype == torch.long and ids[0] == ids[1] != ids[2] and ids.min() >= 0


def test_onset_error_metric():
    m = OnsetError(tolerance_ms=50)
    m.update(torch.tensor([0.10, 0.50]), torch.tensor([0.12, 0.40]), torch.tensor([0.0, 0.4]))
    m.update(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.3]))
    out = m.compute()
    assert float(out["onset_error_ms"]) == pytest.approx((20 + 100 + 0) / 3, rel=1e-5)
    assert float(out["onset_baseline_ms"]) == pytest.approx((120 + 0 + 300) / 3, rel=1e-5)
    assert float(out["onset_within_50ms"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equal 1-D"):
        m.update(torch.zeros(2), torch.zeros(3), torch.zeros(2))
