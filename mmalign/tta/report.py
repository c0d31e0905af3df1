"""Outputs of a TTA run: the per-domain error table (stdout), JSON, CSV and the error-along-stream plot."""

from __future__ import annotations

import csv
import json
import math
import os

from .stream import StreamResult


def _short(domain: str) -> str:
    name, _, sev = domain.partition("/")
    return "".join(w[:4] for w in name.split("_"))[:8] + (f"{sev}" if sev else "")


def error_table(result: StreamResult) -> str:
    """Rows = methods, columns = domains (last round) + mean of the first and of the last round."""
    last = result.domain_errors(result.rounds - 1)
    per_round = result.round_errors()
    cols = [_short(d) for d in result.domains]
    extra = ["mean"] if result.rounds == 1 else ["mean r1", f"mean r{result.rounds}"]
    width = max(6, *(len(c) for c in cols))
    head = f"{'method':<12}" + "".join(f"{c:>{width + 1}}" for c in cols + extra)
    lines = [f"error % ({result.setting}, {result.rounds} round(s); domain columns: "
             f"{'last round' if result.rounds > 1 else 'one pass'})", head, "-" * len(head)]
    for m in result.methods:
        vals = [last[m][d] for d in result.domains]
        vals += [per_round[m][0]] if result.rounds == 1 else [per_round[m][0], per_round[m][-1]]
        lines.append(f"{m:<12}" + "".join(f"{v:>{width + 1}.1f}" for v in vals))
    return "\n".join(lines)


def summary(result: StreamResult) -> dict:
    tput = result.throughput()
    base = tput.get("source")
    return {
        "setting": result.setting, "rounds": result.rounds, "domains": result.domains, "methods": result.methods,
        "error_by_round_domain": [result.domain_errors(r) for r in range(result.rounds)],
        "error_by_round": result.round_errors(),
        "images_per_s": tput,
        "throughput_vs_source": {m: v / base for m, v in tput.items()} if base and not math.isnan(base) else {},
        "images_per_method": result.images,
    }


def write_outputs(result: StreamResult, out_dir: str, plot: bool = True, extra: dict | None = None) -> dict[str, str]:
    """Write ``results.json``, ``errors.csv`` (method, round, domain, error %, n) and
    ``error_stream.png``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "csv": os.path.join(out_dir, "errors.csv")}
    with open(paths["json"], "w") as fh:
        json.dump({**summary(result), **(extra or {})}, fh, indent=2)
    counts: dict[tuple, list[int]] = {}
    for r in result.records:
        acc = counts.setdefault((r["method"], r["round"], r["domain"]), [0, 0])
        acc[0] += r["wrong"]
        acc[1] += r["n"]
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "round", "domain", "error_pct", "n"])
        for (m, rnd, d), (wrong, n) in counts.items():
            w.writerow([m, rnd + 1, d, f"{100.0 * wrong / n:.3f}", n])
    if plot:
        paths["png"] = os.path.join(out_dir, "error_stream.png")
        plot_stream(result, paths["png"])
    return paths


def plot_stream(result: StreamResult, path: str) -> None:
    """Error % per batch along the stream (x = images seen), one line per method, dotted lines at
    domain shifts, labelled in the first round."""
    import matplotlib

    matplotlib.use("Agg")  # headless; never opens a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(result.domains) * result.rounds ** 0.5), 4))
    shifts = []
    for m in result.methods:
        xs, ys, seen, prev = [], [], 0, None
        for r in (r for r in result.records if r["method"] == m):
            key = (r["round"], r["domain"])
            if key != prev and m == result.methods[0]:
                shifts.append((seen, r["domain"], r["round"]))
            prev = key
            seen += r["n"]
            xs.append(seen)
            ys.append(100.0 * r["wrong"] / r["n"])
        ax.plot(xs, ys, label=m, lw=1)
    for x, d, rnd in shifts:
        ax.axvline(x, color="grey", lw=0.4, ls=":")
        if rnd == 0 and len(result.domains) > 1:
            ax.text(x, 1.0, _short(d), rotation=90, fontsize=6, va="bottom", transform=ax.get_xaxis_transform())
    ax.set_xlabel("images seen")
    ax.set_ylabel("batch error %")
    ax.set_ylim(0, 100)
    ax.set_title(f"error along the stream ({result.setting}, {result.rounds} round(s))", fontsize=9, pad=40)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
