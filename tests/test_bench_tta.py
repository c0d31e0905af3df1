"""``scripts/bench_tta.py report`` end to end on a cut-down recipe: one process per seed, then ``--merge``,
as docs/tta.md runs it. Checks the bookkeeping (each seed's own source model and rows, the joined claims),
not the verdicts. Slow: two source-model fits."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = ["--severities", "5", "--rounds", "1", "--mild-rounds", "1", "--max-batches", "1",
          "--sweep-corruptions", "gaussian_noise", "--arms", "source", "norm", "tent"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_report_per_seed_then_merged(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    script = os.path.join(ROOT, "scripts", "bench_tta.py")
    common = ["--root", str(tmp_path / "work"), "--data-root", str(tmp_path / "data"), *RECIPE]

    def run(*argv):
        proc = subprocess.run([sys.executable, script, "report", *argv, *common], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    outs = [tmp_path / f"s{s}.json" for s in (0, 1)]
    for seed, out in zip((0, 1), outs):
        run("--seeds", str(seed), "--out", str(out))
        res = json.loads(out.read_text())
        assert [r["seed"] for r in res["runs"]] == [seed]
    # each seed trained its own source model
    sources = sorted(os.listdir(tmp_path / "work" / "sources"))
    assert sources == ["seed0", "seed1"]
    merged = tmp_path / "merged.json"
    text = run("--merge", *map(str, outs), "--out", str(merged))
    res = json.loads(merged.read_text())
    assert sorted(r["seed"] for r in res["runs"]) == [0, 1]
    assert res["claims"] and all(c["verdict"] in ("holds", "fails", "not shown") for c in res["claims"])
    assert "tent" in res["table"] and "claims" in text
    # a seed given twice is refused rather than averaged twice
    proc = subprocess.run([sys.executable, script, "report", "--merge", str(outs[0]), str(outs[0]),
                           "--out", str(tmp_path / "twice.json"), *common], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "seed twice" in proc.stderr
