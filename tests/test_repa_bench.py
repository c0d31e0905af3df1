"""scripts/bench_repa.py's summary: a seed that never reaches the baseline's FD is reported, never imputed; the
probe claims are paired over seeds."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    spec = importlib.util.spec_from_file_location("bench_repa", os.path.join(ROOT, "scripts", "bench_repa.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(arm, seed, fds, probe=None):
    r = {"arm": arm, "seed": seed, "fd": [[200 * (i + 1), f] for i, f in enumerate(fds)], "step_s_median": 0.1}
    if probe is not None:
        r["probe"] = {"t=0.5": probe}
    return r


def test_a_seed_that_never_reaches_the_target_is_not_imputed(capsys):
    b = _bench()
    results = [_run("dit_none", 0, [300, 200, 100]), _run("dit_repa", 0, [250, 100, 90]),   # reached at step 400
               _run("dit_none", 1, [300, 200, 100]), _run("dit_repa", 1, [300, 200, 110]),  # never reaches 100
               _run("dit_none", 2, [300, 200, 100]), _run("dit_repa", 2, [300, 150, 95])]
    s = b.summarise(results, None)["speedup"]["dit_repa"]
    ratios = [r["ratio"] for r in s["per_seed"]]
    assert ratios[0] == 600 / 400 and ratios[1] is None and ratios[2] is not None
    assert s["reached"] == 2 and s["seeds"] == 3 and "interval" not in s and "half_the_steps" not in s
    b.print_table(b.summarise(results, None))
    out = capsys.readouterr().out
    assert "seed 1: not reached" in out and "reached in 2 of 3 seeds" in out and ">= 2x speed-up: not shown" in out


def test_all_seeds_reached_gives_the_interval_and_probe_claims(capsys):
    b = _bench()
    results = []
    for seed in range(4):
        results.append(_run("dit_none", seed, [300, 200, 100], {"probe_shape": 0.5 + 0.01 * seed, "cknna": 0.2}))
        results.append(_run("dit_repa", seed, [200, 100, 80], {"probe_shape": 0.8 + 0.01 * seed, "cknna": 0.21 + 0.01 * seed}))
    summary = b.summarise(results, None)
    s = summary["speedup"]["dit_repa"]
    assert s["reached"] == 4 and s["interval"].mean == 600 / 400
    claims = {r["claim"]: r for r in summary["claims"]}
    shape = claims["dit_repa: probe shape accuracy (mean over t) higher than dit_none"]
    assert shape["paired"] and shape["verdict"] == "holds" and abs(shape["diff"] - 0.3) < 1e-9
    b.print_table(summary)
    assert "probe_shape" in capsys.readouterr().out
