"""The tools: ``mmalign export``, ``mmalign data generate|convert|corrupt``, ``mmalign weights fetch``,
``mmalign tta stats``.

They sit beside LightningCLI's subcommands (``fit``, ``zeroshot``, ...) but are plain argparse
commands: none of them trains or needs a config, so none of them pays for building a Trainer. Each is
a module with a docstring (its ``--help`` text, examples included), ``add_arguments(parser)`` and
``run(args)`` (its one-line summary is in ``SUMMARIES`` here); ``run`` checks its inputs before any work and
raises ``ToolError`` with one line naming the problem and the fix.

This module imports only the standard library: ``python -m mmalign --help`` lists the tools without
importing them, and each tool imports what it needs (torch, open_clip, timm) inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.util import find_spec
from typing import Any

#: (group, command) or (command,) -> (module, package it needs: absent when its method folder is deleted)
TOOLS: dict[tuple[str, ...], tuple[str, str]] = {
    ("export",): ("mmalign.tools.export", "mmalign.models"),
    ("data", "generate"): ("mmalign.tools.data_generate", "datamodules"),
    ("data", "convert"): ("mmalign.tools.data_convert", "datamodules"),
    ("data", "corrupt"): ("mmalign.tools.data_corrupt", "datamodules"),
    ("weights", "fetch"): ("mmalign.tools.weights", "mmalign.models"),
    ("tta", "stats"): ("mmalign.tools.tta_stats", "mmalign.tta"),
}
#: one line per tool for ``--help`` listings (kept here so listing imports no tool module)
SUMMARIES = {
    ("export",): "an mmalign CLIP/SigLIP checkpoint as a portable open_clip folder (local-dir:)",
    ("data", "generate"): "write a built-in dataset (shapes, digits, spoken) as webdataset shards",
    ("data", "convert"): "an image folder or a CSV of (image, caption[, label]) as webdataset shards",
    ("data", "corrupt"): "CIFAR-10-C style corrupted copies of image shards (15 corruptions, severities 1-5)",
    ("weights", "fetch"): "fetch pretrained weights offline into weights/ (mobilenetv2: torchvision's ImageNet)",
    ("tta", "stats"): "CAFA's source statistics for a classifier checkpoint, stored beside it",
}


class ToolError(ValueError):
    """A tool's input is wrong: printed as one line (``mmalign <tool>: error: ...``), exit status 2."""


class ToolParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): the problem, and where the options are listed."""

    def error(self, message: str):  # argparse calls this for unknown options, missing ones, bad types
        raise ToolError(f"{message} ({self.prog} --help lists the options)")


def _available(key: tuple[str, ...]) -> bool:
    try:
        return find_spec(TOOLS[key][1]) is not None
    except ModuleNotFoundError:
        return False


def listing(indent: str = "  ") -> str:
    """The tools, one per line, for the top-level ``--help``."""
    keys = [k for k in TOOLS if _available(k)]
    width = max(len(" ".join(k)) for k in keys)
    return "\n".join(f"{indent}{' '.join(k):<{width}}  {SUMMARIES[k]}" for k in keys)


def _group_help(group: str) -> str:
    keys = [k for k in TOOLS if k[0] == group and _available(k)]
    lines = [f"usage: mmalign {group} {{{','.join(k[1] for k in keys)}}} ...", "", "commands:"]
    lines += [f"  {k[1]:<10}  {SUMMARIES[k]}" for k in keys]
    lines += ["", f"mmalign {group} COMMAND --help lists a command's options."]
    return "\n".join(lines)


def _match(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """(tool key, its own arguments) when ``argv`` names a tool; ``None`` when it is not a tool at all."""
    if not argv or argv[0] not in {k[0] for k in TOOLS}:
        return None
    if (argv[0],) in TOOLS:
        return (argv[0],), argv[1:]
    group = argv[0]
    if len(argv) > 1 and (group, argv[1]) in TOOLS:
        return (group, argv[1]), argv[2:]
    if len(argv) == 1 or argv[1] in ("-h", "--help"):
        return (group,), ["--help"]
    known = ", ".join(k[1] for k in TOOLS if k[0] == group)
    raise ToolError(f"unknown command 'mmalign {group} {argv[1]}'; choose one of: {known}")


def parser_for(key: tuple[str, ...]) -> tuple[ToolParser, Any]:
    module = importlib.import_module(TOOLS[key][0])
    parser = ToolParser(prog="mmalign " + " ".join(key), description=module.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser, module


def call(*argv: str) -> Any:
    """Run a tool in this process as the command line would (``call("data", "convert", "--csv", ...)``);
    returns what the tool returns and raises ``ToolError`` for bad input."""
    found = _match(list(argv))
    if found is None or found[0] not in TOOLS:
        raise ToolError(f"'{' '.join(argv[:2])}' is not a tool")
    key, rest = found
    parser, module = parser_for(key)
    return module.run(parser.parse_args(rest))


def dispatch(argv: list[str]) -> int | None:
    """Run the tool ``argv`` names and return its exit status; ``None`` when ``argv`` names no tool
    (then it is a LightningCLI command). Errors a user can fix print one line, not a traceback."""
    name = "mmalign " + " ".join(argv[:1] if argv[:1] == ["export"] else argv[:2])
    try:
        found = _match(argv)
        if found is None:
            return None
        key, rest = found
        if key not in TOOLS:  # a bare group: list its commands
            print(_group_help(key[0]))
            return 0
        if not _available(key):
            raise ToolError(f"'mmalign {' '.join(key)}' needs {TOOLS[key][1]}, which is not in this installation")
        from mmalign.quiet import quiet_third_party

        quiet_third_party()
        parser, module = parser_for(key)
        args = parser.parse_args(rest)
        module.run(args)
        return 0
    except ToolError as exc:
        sys.stderr.write(f"{name}: error: {exc}\n")
        return 2
    except BrokenPipeError:  # the reader closed stdout (`| head`): the entry point exits quietly
        raise
    except (ValueError, OSError) as exc:  # the library's own one-line errors (a bad checkpoint, a full disk)
        sys.stderr.write(f"{name}: error: {type(exc).__name__}: {exc}\n")
        return 1
