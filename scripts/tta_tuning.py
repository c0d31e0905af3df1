"""The tuning half of ``bench_tta.py`` (``tune`` and ``sensitivity`` modes): the prior strength N and the
guard's thresholds are chosen here, on the validation shifts (``tta_shifts.VAL_MILD``/``VAL_STRONG``) and
``TUNING_SEEDS`` only; ``sensitivity`` shows what the chosen N costs on the reported streams without
choosing anything there."""

from __future__ import annotations

import math
import os

from bench_tta import DEFAULT_ARMS, _brief, log, make_stream, run_arms, seed_model, variant
from benchstats import cell
from tta_shifts import REPORT_MILD, VAL_MILD, VAL_STRONG, write_shift_folders

COLLAPSE_LR = (100, 1000)  # tent at these multiples of the learning rate: the guard's positive cases
PRIORS = (0.0, 64.0, 256.0, 1024.0, 2048.0, math.inf)
#: the class-spread rule's threshold (guard.min_class_spread), fixed before tuning: a batch of 200 over 6 of
#: 10 classes scores 0.79, a class-balanced batch of 16 or more about 0.93-1.0 (mmalign.tta.guard.class_spread)
SPREAD = 0.85
SENSITIVITY_PRIORS = (0.0, 256.0, 1024.0)


def prior_grid(model, stream, priors) -> dict:
    """Error of norm and tent per prior strength N, without and with the guard's source fallback (+fb), and
    with the fallback plus the class-spread rule (+fbs, ``SPREAD``); one continual round, each N with its
    own baseline. ``fallbacks@N``: the batches the +fbs arms took with the source statistics, of all."""
    from mmalign.tta.methods import Norm, Tent, TTAMethod
    from mmalign.tta.stream import run_stream

    out = {}
    for n in priors:
        cfg = variant(model.cfg, prior=n)
        methods = {"source": TTAMethod(model.source, cfg), "norm": Norm(model.source, cfg),
                   "tent": Tent(model.source, cfg), "norm+fb": Norm(model.source, cfg), "tent+fb": Tent(model.source, cfg)}
        res = run_stream(methods, stream, "continual", 1, reference=model.source, baseline=Norm(model.source, cfg),
                         fallback=["norm+fb", "tent+fb"])
        errs = {a: e[0] for a, e in res.round_errors().items()}
        spread = {"norm+fbs": Norm(model.source, cfg), "tent+fbs": Tent(model.source, cfg)}
        res_s = run_stream(spread, stream, "continual", 1, reference=model.source, baseline=Norm(model.source, cfg),
                           fallback=list(spread), min_class_spread=SPREAD)
        errs.update({a: e[0] for a, e in res_s.round_errors().items()})
        out["source"] = errs.pop("source")
        out.update({f"{a}@{n:g}": e for a, e in errs.items()})
        batches = sum(r["method"] == "norm+fbs" for r in res_s.records)
        out[f"fallbacks@{n:g}"] = [spread["norm+fbs"].fallbacks, batches]
    return out


def sensitivity_seed(seed: int, args) -> dict:
    """The price of the chosen prior on the reported streams (not used to choose it): norm and tent per N on
    the mild shifts and at severity 5, one round."""
    model, _, _ = seed_model(seed, args, sources_only=True)
    folders = write_shift_folders(os.path.join(args.data_root, "digits", "test"),
                                  os.path.join(args.root, "shifts", f"seed{seed}"), REPORT_MILD, seed)
    out = {"seed": seed, "priors": {}}
    out["priors"]["mild"] = prior_grid(model, make_stream(model, seed, args, folders=folders, shuffle=False),
                                       SENSITIVITY_PRIORS)
    out["priors"]["severity5"] = prior_grid(model, make_stream(model, seed, args, severity=5), SENSITIVITY_PRIORS)
    log(f"sensitivity seed {seed}: " + "  ".join(f"{k}: " + " ".join(f"{a} {e:.1f}" for a, e in v.items()
                                                                   if not a.startswith("fallbacks"))
                                                 for k, v in out["priors"].items()))
    return out


def tune_seed(seed: int, args) -> dict:
    """Per prior strength N, on every validation stream: norm and tent with and without the guard's
    source fallback; the guard's signals on healthy runs; forced collapses with the guard off and on."""
    from mmalign.tta.guard import Guard
    from mmalign.tta.methods import Norm, Tent
    from mmalign.tta.specs import GuardSpec
    from mmalign.tta.stream import run_stream

    model, stats, fisher = seed_model(seed, args)
    folders = write_shift_folders(os.path.join(args.data_root, "digits", "test"),
                                  os.path.join(args.root, "shifts", f"seed{seed}"), VAL_MILD + VAL_STRONG, seed)
    out = {"seed": seed, "priors": {}, "guard": {}}
    for family, shifts in (("mild", VAL_MILD), ("strong", VAL_STRONG)):
        for order in ("sorted", "shuffled"):
            key = f"{family}/{order}"
            stream = make_stream(model, seed, args, folders={s: folders[s] for s in shifts}, shuffle=order == "shuffled")
            out["priors"][key] = prior_grid(model, stream, PRIORS)
            log(f"tune seed {seed} {key}: " + "  ".join(f"{a} {e:.1f}" for a, e in out["priors"][key].items()
                                                         if not a.startswith("fallbacks")))
            if key in ("mild/sorted", "strong/shuffled"):  # the guard on healthy runs: how near each threshold
                healthy = run_arms(model, stream, DEFAULT_ARMS, stats, fisher, 2, GuardSpec(reset=False))
                out["guard"][key] = healthy["guard_extremes"]
    # forced collapses: tent at 100x and 1000x the learning rate, pure batch statistics, 3 rounds (strong
    # shifts), the guard watching only and the guard resetting
    stream = make_stream(model, seed, args, folders={s: folders[s] for s in VAL_STRONG}, shuffle=True)
    cfg0 = variant(model.cfg, prior=0.0)
    methods, guards = {"norm": Norm(model.source, cfg0)}, {}
    for k in COLLAPSE_LR:
        for watch in (True, False):
            name = f"tent_lr{k}" + ("" if watch else "+guard")
            methods[name] = Tent(model.source, variant(model.cfg, prior=0.0, lr=k * model.cfg.adapt.lr))
            guards[name] = Guard(GuardSpec(reset=not watch, source_fallback=False))
    res = run_stream(methods, stream, "continual", 3, guards=guards, baseline=Norm(model.source, cfg0))
    out["collapse"] = {"error_by_round": res.round_errors(), "resets": len(res.resets),
                       "extremes": {a: g.extremes for a, g in guards.items() if "+guard" not in a}}
    log(f"tune seed {seed} forced collapse: " + _brief(out["collapse"]) + f" ({len(res.resets)} resets)")
    return out


def summarise_tuning(runs) -> str:
    keys = list(runs[0]["priors"])
    lines = ["validation shifts (TUNING_SEEDS; never reported): error % per prior strength N, mean over seeds",
             f"{'stream':<24}{'source':>8}" + "".join(f"{'N=' + format(n, 'g'):>9}" for n in PRIORS)]

    def mean(k, arm):
        return sum(r["priors"][k][arm] for r in runs) / len(runs)

    for method in ("norm", "norm+fb", "norm+fbs", "tent", "tent+fb", "tent+fbs"):
        for k in keys:
            lines.append(f"{method + ' ' + k:<24}{mean(k, 'source'):>8.1f}" +
                         "".join(f"{mean(k, f'{method}@{n:g}'):>9.1f}" for n in PRIORS))
    lines.append("\nN: worst mild excess over source (points, mean over seeds, either order) | share of norm@N=0's "
                 "strong gain kept (both orders)")
    for fb in ("", "+fb", "+fbs"):
        for n in PRIORS:
            worst = max(mean(k, f"{m}{fb}@{n:g}") - mean(k, "source") for k in keys if k.startswith("mild")
                        for m in ("norm", "tent"))
            gain0 = sum(mean(k, "source") - mean(k, "norm@0") for k in keys if k.startswith("strong"))
            gain = sum(mean(k, "source") - mean(k, f"norm{fb}@{n:g}") for k in keys if k.startswith("strong"))
            lines.append(f"  norm/tent{fb:<4} N={n:<6g}: {worst:+.2f} | {100 * gain / gain0:.0f}%")
    lines.append(f"\nclass-spread rule (min_class_spread {SPREAD}): batches taken with the source statistics by the "
                 "+fbs arms, of all batches (sum over seeds and N)")
    for k in keys:
        fb = [sum(r["priors"][k][f"fallbacks@{n:g}"][i] for r in runs for n in PRIORS) for i in (0, 1)]
        lines.append(f"  {k:<16} {fb[0]} of {fb[1]}")
    for key in ("agreement", "class_gain", "entropy_ratio"):
        pick = min if key != "class_gain" else max
        healthy = [g[key] for r in runs for fam in r["guard"].values() for g in fam.values() if g]
        collapsed = [round(e[key], 3) for r in runs for e in r["collapse"]["extremes"].values() if e]
        lines.append(f"guard {key}: most extreme healthy average {pick(healthy):.3f}; tent at "
                     f"{'x, '.join(map(str, COLLAPSE_LR))}x lr (per seed) {collapsed}")
    for r in runs:
        lines.append(f"forced collapse, seed {r['seed']}: " + "  ".join(
            f"{a} {e[0]:.1f}->{e[-1]:.1f}" for a, e in r["collapse"]["error_by_round"].items())
            + f" ({r['collapse']['resets']} resets)")
    return "\n".join(lines)


def summarise_sensitivity(runs) -> str:
    lines = [f"prior sensitivity on the reported streams (seeds {[r['seed'] for r in runs]}; shown, not used to "
             "choose): error %, one round", f"{'arm':<14}{'mild (class-sorted)':>22}{'severity 5':>16}"]
    for arm in ["source"] + [f"{m}@{n:g}" for m in ("norm", "norm+fb", "tent", "tent+fb") for n in SENSITIVITY_PRIORS]:
        lines.append(f"{arm:<14}" + "".join(f"{cell([r['priors'][k][arm] for r in runs]):>{w}}"
                                             for k, w in (("mild", 22), ("severity5", 16))))
    return "\n".join(lines)

