"""The seed-statistics helper every benchmark uses (scripts/benchstats.py)."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import benchstats  # noqa: E402


def test_interval_is_the_student_t_interval():
    from scipy import stats

    xs = [0.61, 0.54, 0.63, 0.58]
    i = benchstats.interval(xs)
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / 4, scale=stats.sem(xs))
    assert (i.n, i.low, i.high) == (4, pytest.approx(lo), pytest.approx(hi))
    one = benchstats.interval([0.5])  # one value has no interval
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.half_width)
    # a failed seed (None/NaN) stops the summary by name instead of vanishing from it
    for bad in (float("nan"), None):
        with pytest.raises(benchstats.MissingSeedError, match="entry 1"):
            benchstats.interval([0.5, bad, 0.7])
    assert benchstats.cell([0.5, 0.7], 1, 100).startswith("60.0 ± ")


def test_compare_separates_distinct_arms_only():
    same = benchstats.compare([1.0, 1.1, 0.9], [1.05, 0.95, 1.0])
    far = benchstats.compare([2.0, 2.1, 1.9], [1.0, 1.1, 0.9])
    assert not same.significant and same.overlap
    assert far.significant and not far.overlap and far.diff == pytest.approx(1.0)
    assert far.verdict("higher").startswith("A better") and far.verdict("lower").startswith("B better")
    assert far.verdict("lower", names=("ring", "gather")).startswith("gather better")


def test_paired_compare_sees_a_consistent_shift_that_welch_misses():
    # the same seeds early and late: each seed moves by about +0.1, but seeds differ by much more
    early, late = [1.0, 2.0, 3.0, 4.0], [1.11, 2.09, 3.1, 4.1]
    assert not benchstats.compare(late, early).significant
    paired = benchstats.compare(late, early, paired=True)
    assert paired.significant and paired.diff == pytest.approx(0.1)
    with pytest.raises(ValueError, match="as many values"):
        benchstats.compare([1.0, 2.0, 3.0], [1.0, 2.0], paired=True)


def test_against_says_holds_fails_or_not_shown():
    assert benchstats.against([0.92, 0.93, 0.94], 0.90).verdict == "holds"
    assert benchstats.against([0.50, 0.52, 0.51], 0.60).verdict == "fails"
    assert benchstats.against([0.55, 0.65, 0.60], 0.60).verdict.startswith("not shown")
    assert benchstats.against([0.95, 0.97, 0.96], 1.0, better="lower").verdict == "holds"


def test_save_writes_strict_json(tmp_path):
    path = benchstats.save(str(tmp_path / "a" / "b.json"),
                           {"x": float("nan"), "i": benchstats.interval([1.0, 2.0]),
                            "t": benchstats.against([1.0, 2.0, 3.0], 0.5)})
    with open(path) as f:
        data = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["x"] is None and data["i"]["n"] == 2
    assert data["t"]["verdict"].startswith("not shown") and data["t"]["target"] == 0.5


def test_load_rows_joins_files_of_one_recipe_and_refuses_another(tmp_path):
    a = benchstats.save(str(tmp_path / "a.json"), {"config": {"steps": 100, "lr": 0.002}, "rows": [{"seed": 0, "x": 1}]})
    b = benchstats.save(str(tmp_path / "b.json"), {"config": {"steps": 100, "lr": 0.002}, "rows": [{"seed": 1, "x": 2}]})
    rows = benchstats.load_rows([a, b], "rows", match={"steps": 100, "lr": 0.002})
    assert [r["seed"] for r in rows] == [0, 1]
    with pytest.raises(ValueError, match=r"seed 1 was run with steps=100, this run uses 200"):
        benchstats.load_rows([b], "rows", match={"steps": 200})
    # a key recorded per row wins over the file's config; an unrecorded key is refused
    c = benchstats.save(str(tmp_path / "c.json"), {"peer": {"runs": [{"seed": 2, "epochs": 2}]}})
    assert benchstats.load_rows([c], "peer", "runs", match={"epochs": 2})[0]["seed"] == 2
    with pytest.raises(ValueError, match="not recorded"):
        benchstats.load_rows([c], "peer", "runs", match={"batch": 128})


def test_holm_is_step_down_and_monotone():
    adj = benchstats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    # sorted p: 0.01*3, max(0.03*2, .03), max(0.04*1, 0.06)
    assert adj["a"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.06) and adj["b"] == pytest.approx(0.06)
    assert math.isnan(adj["d"])


def test_claim_table_verdicts_under_holm():
    t = benchstats.ClaimTable()
    base = [0.50, 0.52, 0.49, 0.51, 0.50]
    t.better("clearly better", [b + 0.10 for b in base], base, paired=True)   # consistent +0.10 per seed
    t.better("clearly worse", [b - 0.10 + 0.001 * i for i, b in enumerate(base)], base, paired=True)
    t.better("noise", [0.5, 0.6, 0.4, 0.55, 0.45], [0.52, 0.48, 0.5, 0.51, 0.49])
    rows = {r["claim"]: r for r in t.decide()}
    assert rows["clearly better"]["verdict"] == "holds"
    assert rows["clearly worse"]["verdict"] == "fails"
    assert rows["noise"]["verdict"] == "not shown"
    assert all(r["p_holm"] >= r["p"] for r in rows.values())


def test_identical_arms_have_no_p_value_not_p_one():
    c = benchstats.compare([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], paired=True)
    assert math.isnan(c.p_value) and not c.significant and "identical" in c.verdict()
