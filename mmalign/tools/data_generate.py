"""Write a built-in dataset as webdataset shards (the datamodules also do this on first use).

    mmalign data generate shapes --root data/shapes
    mmalign data generate digits --root data/digits --seed 1 --image-size 48
    mmalign data generate spoken --root data/spoken --num-train 6000 --num-test 100 --num-val 200

Writes ``ROOT/<split>/<split>-NNNNNN.tar`` with a ``sizes.json`` per split and ``ROOT/info.json``:
exactly what ``generate: NAME`` in a config writes, so a datamodule reads the folder without
generating anything. ``shapes``: train, val, test and heldout (colour x shape combinations never seen
in training); ``digits``: train, test; ``spoken`` (needs ``apt-get install espeak-ng``): train, test
(held-out voices AND texts), ``val`` (its own held-out voices and texts) with ``--num-val``, and
``test_seen_voice`` (training voices, test texts) with ``--num-seen-voice``. An option the chosen
dataset does not have is refused by name. A ROOT that already holds the same dataset is kept as it is.
"""

from __future__ import annotations

import argparse

_OPTIONS = {  # flag -> (type, help); which dataset takes which is the generators' own signature
    "seed": (int, "fixes every sample (and spoken's voice/text split); default 0"),
    "image_size": (int, "shapes, digits: image side in pixels"),
    "shard_size": (int, "samples per .tar shard"),
    "num_train": (int, "shapes, spoken: training samples"),
    "num_val": (int, "shapes; spoken: validation clips with their own held-out voices and texts (0: none)"),
    "num_test": (int, "shapes; spoken: unseen-voice, unseen-text test clips"),
    "num_heldout": (int, "shapes only: samples of the held-out colour x shape combinations"),
    "num_seen_voice": (int, "spoken only: seen-voice, unseen-text clips (0: skip the split)"),
    "test_fraction": (float, "spoken only: fraction of voices and of texts held out for test"),
    "val_fraction": (float, "spoken only: fraction of the non-test voices and texts held out for val"),
    "sample_rate": (int, "spoken only: output rate in Hz"),
    "max_seconds": (float, "spoken only: longest clip kept, in seconds"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=["shapes", "digits", "spoken"])
    p.add_argument("--root", required=True, help="output folder (must not exist yet, or already hold this dataset)")
    for name, (kind, text) in _OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)


def run(args: argparse.Namespace) -> dict:
    import logging
    import re
    import time

    from datamodules.generate import generate_dataset
    from datamodules.specs import GenerateSpec
    from mmalign.tools import ToolError

    kwargs = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None}
    try:  # the datamodules' own check: an option the generator lacks, or a zero/negative size, in one line
        GenerateSpec(args.dataset, kwargs)
    except ValueError as exc:  # name the spec's fields as this command's flags
        flag = lambda m: "--" + m.group(1).replace("_", "-")  # noqa: E731
        message = re.sub(r"generate\.kwargs\.(\w+)", flag, str(exc).replace("generate.kwargs: ", ""))
        raise ToolError(re.sub(r"'(\w+)'(?= is not an option)|(?<=[\[ ])'(\w+)'(?=[,\]])",
                               lambda m: "--" + (m.group(1) or m.group(2)).replace("_", "-"), message)) from None
    # the generators report through logging (the first-use notice, skipped clips): show them plainly
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        info = generate_dataset(args.dataset, args.root, **kwargs)
    except RuntimeError as exc:  # spoken without espeak-ng: the message says how to install it
        if type(exc).__name__ != "EspeakUnavailableError":
            raise
        raise ToolError(str(exc)) from None
    skipped = {k: v for k, v in (info.get("skipped") or {}).items() if v} if isinstance(info.get("skipped"), dict) else {}
    print(f"wrote {args.root} in {time.perf_counter() - t0:.1f} s" + (f"; skipped {skipped}" if skipped else ""))
    return info
