"""Third-party messages that are expected on every mmalign run, silenced one by one at their source.

Each entry names the library, the logger or warning, and why the message is noise here; nothing is
filtered by category or level alone, so a genuine warning from any library or from user code still
prints. Applied once at CLI start (``python -m mmalign ...`` and the tools); a library user who
imports mmalign gets the libraries' defaults.

- transformers' load report (logger ``transformers.modeling_utils``) listing only ``pooler.*`` keys as
  UNEXPECTED: open_clip builds an HF text tower without BERT's pooler (it mean-pools), so the
  checkpoint's pooler weights are unused by design. A report with any other key still prints.
- transformers' "Loading weights" progress bar: a bar per text-tower load, before the run's own.
- open_clip's ``WARNING:root:Model NAME initialized partially.``: logged on the root logger whenever a
  tower's weights come from elsewhere (our timm image tower checkpoint, the locked HF text tower).
- Lightning's "💡 Tip: ... litlogger" advertisement (logger ``lightning.pytorch.utilities.rank_zero``;
  its other messages, such as "GPU available", still print).
- Lightning's ``IterableDataset has __len__ defined`` warning: mmalign's streams define ``__len__``
  per rank and worker on purpose (``mmalign.distributed`` slot arithmetic), which is what it warns about.
- Lightning's "Found N module(s) in eval mode at the start of training": the locked towers (and the
  frozen BatchNorm of a locked image tower) are in eval mode on purpose.
- Lightning's "GPU available: False, used: False" / "TPU available: False, using: 0 TPU cores" on a
  machine without them (an accelerator that is present still prints), and "Loading `train_dataloader`
  to estimate number of stepping batches." (a step of its own set-up, not news to a user).
- Lightning's ``isinstance(treespec, LeafSpec)`` deprecation: Lightning's own use of a torch API,
  nothing a user can change.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

_LIGHTNING_WARNINGS = (
    r"Your `IterableDataset` has `__len__` defined\.",
    r"Found \d+ module\(s\) in eval mode at the start of training\.",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
_REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*(\w+)\s*\|")
_applied = False


class _PoolerOnlyLoadReport(logging.Filter):
    """Drops transformers' load report when every key it lists is an UNEXPECTED ``pooler.*`` key."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [m.groups() for m in map(_REPORT_ROW.match, message.splitlines()) if m and m.group(1) != "Key"]
        return not rows or not all(key.startswith("pooler.") and status == "UNEXPECTED" for key, status in rows)


class _OpenClipPartialInit(logging.Filter):
    """Drops open_clip's root-logger ``Model NAME initialized partially.`` (only when open_clip logs it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg.__class__ is str and record.msg.endswith("initialized partially.")
                    and "open_clip" in record.pathname)


_LIGHTNING_NOTHING_NEW = (re.compile(r"^(GPU available: False, used: False|TPU available: False, using: 0 TPU cores)$"),
                          re.compile(r"^Loading `train_dataloader` to estimate number of stepping batches\.$"))


class _LitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "try installing [litlogger]" not in message and not any(p.match(message) for p in _LIGHTNING_NOTHING_NEW)


def plain_notices() -> None:
    """mmalign's own notices (data generation, resume, skipped samples) as ``[mmalign] message`` lines:
    once a library configures the root logger (open_clip does), they would read ``WARNING:datamodules...``.
    Called by the process entry points only (``python -m mmalign``, the ``mmalign`` script): in a process
    that imports mmalign, the records keep propagating to the host's handlers (and pytest's caplog)."""
    for name in ("datamodules", "mmalign"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[mmalign] %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False


def reader_closed_early(exc: BrokenPipeError) -> int:
    """``mmalign --help | head``: the reader closed the pipe. Later writes (and the interpreter's final flush)
    go to /dev/null, and the exit status is a pipe writer's killed by SIGPIPE (141), as ``yes | head``
    reports it, instead of a BrokenPipeError traceback."""
    del exc
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout already closed or replaced: nothing left to flush
        pass
    return 141


def quiet_third_party() -> None:
    """Install the filters above (idempotent)."""
    global _applied
    if _applied:
        return
    _applied = True
    logging.getLogger("transformers.modeling_utils").addFilter(_PoolerOnlyLoadReport())
    logging.getLogger().addFilter(_OpenClipPartialInit())
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_LitLoggerTip())  # rank_zero_info logs through one of the two
    for message in _LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # transformers' progress bars read this switch when transformers is imported (importing it here would
    # slow every start-up); a user who set it keeps their value
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
