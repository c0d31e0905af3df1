"""Outputs of a TTA run: the per-domain table (stdout), JSON, CSV and the plot along the stream.

A labelled stream reports error %; an unlabelled one the mean prediction entropy (nats), the only
signal it has (``entropy_by_round_domain`` is written for labelled streams too).
"""

from __future__ import annotations

import csv
import json
import math
import os

from mmalign.jsonout import strict

from .results import StreamResult


def _short(domain: str) -> str:
    name, _, sev = domain.partition("/")
    return "".join(w[:4] for w in name.split("_"))[:8] + (f"{sev}" if sev else "")


def error_table(result: StreamResult) -> str:
    """Rows = methods, columns = domains (last round) + mean of the first and of the last round."""
    labelled = result.labelled
    last = result.domain_errors(result.rounds - 1) if labelled else result.domain_entropy(result.rounds - 1)
    per_round = result.round_errors() if labelled else result.round_entropy()
    cols = [_short(d) for d in result.domains]
    extra = ["mean"] if result.rounds == 1 else ["mean r1", f"mean r{result.rounds}"]
    width = max(6, *(len(c) for c in cols + extra))  # every label fits, two spaces apart
    head = f"{'method':<12}" + "".join(f"  {c:>{width}}" for c in cols + extra)
    what = "error %" if labelled else "unlabelled: mean prediction entropy (nats)"
    lines = [f"{what} ({result.setting}, {result.rounds} round(s); domain columns: "
             f"{'last round' if result.rounds > 1 else 'one pass'})", head, "-" * len(head)]
    for m in result.methods:
        vals = [last[m][d] for d in result.domains]
        vals += [per_round[m][0]] if result.rounds == 1 else [per_round[m][0], per_round[m][-1]]
        lines.append(f"{m:<12}" + "".join(f"  {v:>{width}.{1 if labelled else 3}f}" for v in vals))
    if not result.complete:
        lines.append(f"INCOMPLETE: the run stopped early ({result.error}); the figures cover what was measured.")
    return "\n".join(lines)


def signals_table(result: StreamResult) -> str:
    """The label-free signals of the last round per method (every domain pooled; per domain in
    results.json): agreement with the source, mean entropy, its trend, the kept fraction, resets."""
    rnd = result.rounds - 1
    sig = result.domain_signals(rnd)
    head = (f"{'method':<12} {'agree %':>8} {'changed %':>9} {'entropy':>8} {'trend':>8} {'kept %':>7} {'resets':>7} "
            f"{'src stats':>9}")
    lines = [f"label-free signals (round {rnd + 1}; agree = with the source model, changed = against the un-adapted "
             "model under the same normalisation, trend = entropy of each domain's second half minus its first, "
             "src stats = batches the guard sent to the source statistics)",
             head, "-" * len(head)]

    def mean(vals):
        vals = [v for v in vals if v == v]  # drop NaN (no reference, no filter, one batch)
        return sum(vals) / len(vals) if vals else float("nan")

    for m in result.methods:
        rows = sig[m].values()
        lines.append(f"{m:<12} {mean(r['agreement_pct'] for r in rows):>8.1f} "
                     f"{mean(r['changed_vs_unadapted_pct'] for r in rows):>9.1f} {mean(r['entropy'] for r in rows):>8.3f} "
                     f"{mean(r['entropy_trend'] for r in rows):>+8.3f} {mean(r['kept_pct'] for r in rows):>7.1f} "
                     f"{sum(r['resets'] for r in rows):>7d} {sum(r['source_fallback_batches'] for r in rows):>9d}")
    return "\n".join(lines)


def summary(result: StreamResult) -> dict:
    tput = result.throughput()
    base = tput.get("source")
    return {
        "complete": result.complete, "error": result.error,
        "setting": result.setting, "rounds": result.rounds, "domains": result.domains, "methods": result.methods,
        "labelled": result.labelled,
        "error_by_round_domain": [result.domain_errors(r) for r in range(result.rounds)] if result.labelled else None,
        "error_by_round": result.round_errors() if result.labelled else None,
        "entropy_by_round_domain": [result.domain_entropy(r) for r in range(result.rounds)],
        "entropy_by_round": result.round_entropy(),
        "agreement_with_source_by_round": result.round_agreement(),
        "signals_by_round_domain": [result.domain_signals(r) for r in range(result.rounds)],
        "guard_resets": result.resets,
        "short_batches": {**result.short_batches,
                          "note": "merged: a domain's short last batch joined the batch before it"},
        "images_per_s": tput,
        "throughput_vs_source": {m: v / base for m, v in tput.items()} if base and not math.isnan(base) else {},
        "images_per_method": result.images,
    }


def write_outputs(result: StreamResult, out_dir: str, plot: bool = True, extra: dict | None = None) -> dict[str, str]:
    """Write ``results.json`` (strict JSON), ``errors.csv`` (method, round, domain, error %, mean
    entropy, agreement with the source %, kept %, resets, n; the error is empty for an unlabelled
    stream) and the plot; return their paths. Atomic: a reader never sees half a file."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "csv": os.path.join(out_dir, "errors.csv")}
    _atomic(paths["json"], lambda fh: json.dump(strict({**summary(result), **(extra or {})}), fh, indent=2,
                                                allow_nan=False))
    counts: dict[tuple, dict] = {}
    for r in result.records:
        acc = counts.setdefault((r["method"], r["round"], r["domain"]),
                                {"wrong": 0, "entropy": 0.0, "agree": 0, "kept": 0.0, "n": 0, "labelled": True,
                                 "has_agree": True, "has_kept": True, "resets": 0})
        acc["wrong"] += r["wrong"] or 0
        acc["entropy"] += r["entropy"]
        acc["n"] += r["n"]
        acc["labelled"] &= r["wrong"] is not None
        acc["has_agree"] &= r.get("agree") is not None
        acc["has_kept"] &= r.get("kept") is not None
        acc["agree"] += r.get("agree") or 0
        acc["kept"] += r.get("kept") or 0
        acc["resets"] += int(r.get("reset", False))

    def pct(value, n, ok):
        return f"{100.0 * value / n:.3f}" if ok and n else ""

    def write_csv(fh):
        w = csv.writer(fh)
        w.writerow(["method", "round", "domain", "error_pct", "entropy", "agreement_pct", "kept_pct", "resets", "n"])
        for (m, rnd, d), a in counts.items():
            w.writerow([m, rnd + 1, d, pct(a["wrong"], a["n"], a["labelled"]), f"{a['entropy'] / a['n']:.4f}",
                        pct(a["agree"], a["n"], a["has_agree"]), pct(a["kept"], a["n"], a["has_kept"]), a["resets"],
                        a["n"]])

    _atomic(paths["csv"], write_csv, newline="")
    if plot and result.records:
        paths["png"] = os.path.join(out_dir, "error_stream.png" if result.labelled else "entropy_stream.png")
        plot_stream(result, paths["png"])
    return paths


def _atomic(path: str, write, newline: str | None = None) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline=newline) as fh:
        write(fh)
    os.replace(tmp, path)


def plot_stream(result: StreamResult, path: str) -> None:
    """Error % per batch along the stream (x = images seen), one line per method, dotted lines at
    domain shifts, labelled in the first round."""
    import matplotlib

    matplotlib.use("Agg")  # headless; never opens a window
    import matplotlib.pyplot as plt

    labelled = result.labelled
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
            ys.append(100.0 * r["wrong"] / r["n"] if labelled else r["entropy"] / r["n"])
        ax.plot(xs, ys, label=m, lw=1)
    for x, d, rnd in shifts:
        ax.axvline(x, color="grey", lw=0.4, ls=":")
        if rnd == 0 and len(result.domains) > 1:
            ax.text(x, 1.0, _short(d), rotation=90, fontsize=6, va="bottom", transform=ax.get_xaxis_transform())
    ax.set_xlabel("images seen")
    ax.set_ylabel("batch error %" if labelled else "batch mean entropy (nats)")
    if labelled:
        ax.set_ylim(0, 100)
    ax.set_title(f"{'error' if labelled else 'entropy'} along the stream ({result.setting}, {result.rounds} round(s))", fontsize=9, pad=40)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
