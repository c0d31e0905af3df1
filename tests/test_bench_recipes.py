"""``scripts/bench_recipes.py --smoke`` end to end (2 steps on tiny generated data): the protocol's
bookkeeping, not its verdicts. Slow: about 15 short runs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~15 tiny runs: minutes on a busy machine
def test_smoke_run_keeps_held_out_out_of_tuning(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_recipes.py"), "--smoke",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    runs = res["runs"]
    tuning = [r for r in runs if not r["heldout_read"]]
    report = [r for r in runs if r["heldout_read"]]
    # 3 arms x 1 lr x 1 tuning seed; 3 arms x 2 report seeds, each read held-out exactly once
    assert sorted((r["arm"], r["seed"]) for r in tuning) == [(a, 100) for a in ("align_uniform", "plain", "recipe")]
    assert sorted((r["arm"], r["seed"]) for r in report) == sorted((a, s) for a in ("plain", "recipe", "align_uniform")
                                                                   for s in (0, 1))
    assert all(r["heldout_zeroshot_top1"] is None and r["val_zeroshot_top1"] is not None for r in tuning)
    assert all(r["heldout_zeroshot_top1"] is not None for r in report)
    assert [c["verdict"] in ("holds", "fails", "not shown") for c in res["claims"]] == [True, True]
    assert "claims (Holm over 2 claims" in proc.stdout
    # a second invocation reads every finished run back instead of training again
    again = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_recipes.py"), "--smoke",
                            "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and '"arm"' not in again.stdout
