"""``scripts/bench_speech.py``'s claim table: the protocol's pairing and Holm correction over its rows."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import bench_speech  # noqa: E402


def _rows(arm: str, s2t: list, shift: tuple = (0.0,) * 5) -> list:
    return [{"arm": arm, "seed": s, "speech2text_r1": v + shift[s], "text2speech_r1": 0.95 + 0.001 * s,
             "wer": 0.15 + 0.002 * s} for s, v in enumerate(s2t)]


def test_consistency_arm_is_compared_paired_by_seed_under_holm():
    base = [0.55, 0.95, 0.70, 0.85, 0.60]  # large spread between seeds; the arm adds about 0.02 on every seed
    rows = _rows("contrastive+ctc", base) + _rows("contrastive+ctc+sdtw", base, shift=(0.02, 0.025, 0.018, 0.022, 0.021))
    claims = {c["claim"]: c for c in bench_speech.claims(rows)}
    # 3 targets of the CTC arm + 3 comparisons of the soft-DTW arm against it, one Holm family
    assert len(claims) == 6
    better = claims["contrastive+ctc+sdtw beats contrastive+ctc: test speech2text_r1"]
    assert better["paired"] and better["verdict"] == "holds"  # unpaired (Welch) it is p ~ 0.9: not shown
    assert claims["contrastive+ctc: test speech2text_r1 >= 0.9"]["verdict"] == "not shown"  # mean 0.73, wide
    assert claims["contrastive+ctc: test wer <= 0.3"]["verdict"] == "holds"
    assert better["p_holm"] > better["p"]  # corrected over the six rows


def test_arms_on_different_seeds_stop_the_table():
    rows = _rows("contrastive+ctc", [0.7, 0.8, 0.75]) + _rows("contrastive+ctc+sdtw", [0.7, 0.8])
    with pytest.raises(SystemExit, match="paired"):
        bench_speech.claims(rows)
