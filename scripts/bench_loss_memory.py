#!/usr/bin/env python
"""Peak memory and step time of open_clip's CLIP/SigLIP losses vs mmalign's tiled ones, CPU.

One forward + backward of the loss alone on random L2-normalised features (global batch N, dim
``--dim``, float32, one process). Each case runs in a fresh subprocess so no allocator cache or
earlier peak leaks in. Per case:

* peak memory: the process's resident high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the step) minus the resident size before it; this counts
  every temporary of forward and backward, not just what autograd keeps;
* saved for backward: bytes of the distinct storages autograd keeps (``saved_tensors_hooks``);
* step time: ``--repeats`` timed steps (the first of them is also the memory step; a tiny warm-up
  run precedes them), mean and 95% interval (``scripts/benchstats.py``).

A reference case whose memory would exceed ``--max-gib`` is skipped and says how much it would need:
estimated by N^2 scaling from the largest batch it did run (or ~6 N x N float32 matrices before
any ran). The checks (>= 8x less memory, <= 1.3x time) are read at the largest batch where both
arms ran; where the reference was skipped the memory ratio is also given against its
extrapolated need, labelled as such.

    python scripts/bench_loss_memory.py --batches 1024 2048 4096 8192 16384 32768 65536
    python scripts/bench_loss_memory.py --batches 65536 --arms tiled --resume   # add to an earlier run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

GIB = 1024**3
ARMS = ("open_clip", "tiled")
LOSSES = ("clip", "siglip")


# ---------------------------------------------------------------- child: one case


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; this benchmark needs Linux")


def _make_loss(arm: str, loss: str, tile: int):
    """A callable (img, txt, scale, bias) -> loss for one arm."""
    if arm == "open_clip":
        import open_clip.loss as oc

        fn = oc.ClipLoss() if loss == "clip" else oc.SigLipLoss()
    else:
        from mmalign.losses.contrastive import ClipLoss, SigLipLoss

        fn = ClipLoss(tile_size=tile, check_inputs=False) if loss == "clip" else SigLipLoss(tile_size=tile,
                                                                                          check_inputs=False)
    if loss == "clip":
        return lambda i, t, s, b: fn(i, t, s)
    return fn


def _step(fn, img, txt, saved: dict | None = None) -> float:
    """One timed forward + backward from fresh leaves (so the feature gradients are part of the step)."""
    import torch

    i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    start = time.perf_counter()
    if saved is None:
        loss = fn(i, t, log_scale.exp(), bias)
    else:
        def pack(x):
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn(i, t, log_scale.exp(), bias)
    loss.backward()
    return time.perf_counter() - start


def run_case(arm: str, loss: str, n: int, dim: int, tile: int, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    fn = _make_loss(arm, loss, tile)
    g = torch.Generator().manual_seed(0)
    small = F.normalize(torch.randn(256, dim, generator=g), dim=1)
    _step(fn, small, small)  # thread pools, kernels and imports warmed outside the measurement
    img = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    txt = F.normalize(img + torch.randn(n, dim, generator=g), dim=1)
    rss_before = _proc_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    saved: dict[int, int] = {}
    times = [_step(fn, img, txt, saved)]
    peak = (_proc_kib("VmHWM") - rss_before) * 1024
    times += [_step(fn, img, txt) for _ in range(repeats - 1)]
    return dict(arm=arm, loss=loss, n=n, dim=dim, tile=tile, threads=threads, peak_bytes=peak,
                saved_bytes=sum(saved.values()), times_s=times)


# ---------------------------------------------------------------- parent: the table


def _key(c: dict) -> tuple:
    return c["arm"], c["loss"], c["n"], c["dim"], c["tile"] if c["arm"] == "tiled" else 0, c["threads"]


def _estimate_ref_bytes(done: list[dict], loss: str, n: int) -> tuple[float, str]:
    """Reference memory at n: N^2 scaling from its largest measured batch, else 6 N x N float32."""
    ran = [c for c in done if c["arm"] == "open_clip" and c["loss"] == loss and c.get("peak_bytes")]
    if ran:
        top = max(ran, key=lambda c: c["n"])
        return top["peak_bytes"] * (n / top["n"]) ** 2, f"N^2 scaling from the measured N={top['n']}"
    return 6 * 4.0 * n * n, "6 N x N float32 matrices (no measured batch yet)"


def _spawn(args, arm: str, loss: str, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", arm, loss, str(n), "--dim", str(args.dim),
           "--tile", str(args.tile), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return dict(arm=arm, loss=loss, n=n, dim=args.dim, tile=args.tile, threads=args.threads,
                    error=f"exit {out.returncode}: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _report(cases: list[dict], batches: list[int], stats) -> dict:
    by = {(c["arm"], c["loss"], c["n"]): c for c in cases}
    rows, checks = [], {}
    header = (f"{'loss':7} {'N':>6} | {'peak MiB oc':>12} {'tiled':>8} {'ratio':>7} | {'saved MiB oc':>12} "
              f"{'tiled':>7} | {'time s oc':>14} {'tiled':>14} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for loss in LOSSES:
        for n in batches:
            ref, til = by.get(("open_clip", loss, n)), by.get(("tiled", loss, n))
            if til is None and ref is None:
                continue
            row = dict(loss=loss, n=n)
            ran = lambda c: c is not None and "times_s" in c  # noqa: E731
            if ran(ref) and ran(til):
                row["memory_ratio"] = ref["peak_bytes"] / til["peak_bytes"]
                row["time_ratio"] = stats.interval(til["times_s"]).mean / stats.interval(ref["times_s"]).mean
                row["time_test"] = stats.compare(til["times_s"], ref["times_s"])
            elif ran(til) and ref is not None and "estimated_bytes" in ref:
                row["memory_ratio_extrapolated"] = ref["estimated_bytes"] / til["peak_bytes"]
            rows.append(row)

            def t(c):
                return stats.cell(c["times_s"], digits=2) if ran(c) else ("skipped" if c else "-")

            mem_ratio = (f"{row['memory_ratio']:.1f}x" if "memory_ratio" in row else
                         f"~{row['memory_ratio_extrapolated']:.0f}x*" if "memory_ratio_extrapolated" in row else "-")
            ref_peak = _mib(ref["peak_bytes"]) if ran(ref) else (
                f"~{_mib(ref['estimated_bytes'])}*" if ref and "estimated_bytes" in ref else "-")
            print(f"{loss:7} {n:>6} | {ref_peak:>12} {_mib(til['peak_bytes']) if ran(til) else '-':>8} "
                  f"{mem_ratio:>7} | {_mib(ref['saved_bytes']) if ran(ref) else '-':>12} "
                  f"{_mib(til['saved_bytes']) if ran(til) else '-':>7} | {t(ref):>14} {t(til):>14} "
                  f"{(str(round(row['time_ratio'], 2)) + 'x') if 'time_ratio' in row else '-':>6}")
    print("* reference skipped; its memory is an N^2 extrapolation, not a measurement.")
    for c in cases:
        if "status" in c or "error" in c:
            print(f"  {c['arm']} {c['loss']} N={c['n']}: {c.get('status') or c.get('error')}")
    for loss in LOSSES:
        both = [r for r in rows if r["loss"] == loss and "memory_ratio" in r]
        if not both:
            continue
        top = max(both, key=lambda r: r["n"])
        mem_ok, time_ok = top["memory_ratio"] >= 8, top["time_ratio"] <= 1.3
        checks[loss] = dict(n=top["n"], memory_ratio=top["memory_ratio"], time_ratio=top["time_ratio"],
                            memory_holds=mem_ok, time_holds=time_ok)
        print(f"{loss}: at N={top['n']} (largest batch where both ran) memory {top['memory_ratio']:.1f}x less "
              f"(target >= 8x: {'holds' if mem_ok else 'does not hold'}), time {top['time_ratio']:.2f}x "
              f"(target <= 1.3x: {'holds' if time_ok else 'does not hold'}; "
              f"{top['time_test'].verdict(better='lower')} with A = tiled)")
        extra = [r for r in rows if r["loss"] == loss and "memory_ratio_extrapolated" in r]
        if extra:
            far = max(extra, key=lambda r: r["n"])
            print(f"{loss}: at N={far['n']} the reference did not run; against its extrapolated need the tiled "
                  f"loss uses ~{far['memory_ratio_extrapolated']:.0f}x less memory (extrapolated, not measured)")
    return dict(rows=rows, checks=checks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case (>= 3 for an interval)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads; 1 by default: on a small shared machine two OpenMP threads that wait "
                   "for each other at every op measured the scheduler, not the loss (10x noisier)")
    p.add_argument("--max-gib", type=float, default=12.0, help="skip a reference case that would need more")
    p.add_argument("--out", default="outputs/bench/loss_memory.json")
    p.add_argument("--resume", action="store_true", help="reuse the cases already in --out with the same settings")
    p.add_argument("--child", nargs=3, metavar=("ARM", "LOSS", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        arm, loss, n = args.child
        print(json.dumps(run_case(arm, loss, int(n), args.dim, args.tile, args.repeats, args.threads)))
        return
    if args.repeats < 1 or args.tile < 1:
        p.error("--repeats and --tile must be >= 1")
    import benchstats as stats

    done: list[dict] = []
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            done = [c for c in json.load(f)["cases"] if "times_s" in c]
    have = {_key(c): c for c in done}
    started = time.perf_counter()
    for n in sorted(args.batches):
        for loss in args.losses:
            # alternate which arm goes first so slow drift of the shared machine hits both alike
            order = list(args.arms) if (n.bit_length() % 2) else list(reversed(args.arms))
            for arm in order:
                key = (arm, loss, n, args.dim, args.tile if arm == "tiled" else 0, args.threads)
                if key in have:
                    continue
                if arm == "open_clip":
                    need, how = _estimate_ref_bytes(done, loss, n)
                    if need > args.max_gib * GIB:
                        c = dict(arm=arm, loss=loss, n=n, dim=args.dim, tile=args.tile, threads=args.threads,
                                 estimated_bytes=need,
                                 status=f"skipped: would need ~{need / GIB:.1f} GiB > --max-gib {args.max_gib} ({how})")
                        print(c["status"] + f" [{arm} {loss} N={n}]", flush=True)
                        done.append(c)
                        continue
                c = _spawn(args, arm, loss, n)
                done.append(c)
                have[key] = c
                msg = c.get("error") or (f"peak {_mib(c['peak_bytes'])} MiB, saved {_mib(c['saved_bytes'])} MiB, "
                                         f"{stats.cell(c['times_s'], digits=2)} s")
                print(f"[{time.perf_counter() - started:6.0f} s] {arm:9} {loss:6} N={n:>6}: {msg}", flush=True)
    wanted = sorted(set(args.batches) | {c["n"] for c in done})
    report = _report(done, wanted, stats)
    stats.save(args.out, dict(settings=dict(dim=args.dim, tile=args.tile, threads=args.threads, dtype="float32",
                                            repeats=args.repeats, max_gib=args.max_gib),
                              cases=done, **report))


if __name__ == "__main__":
    main()
