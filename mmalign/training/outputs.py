"""Output locations are checked before any work is done.

A run dir, checkpoint dir or results folder that cannot be written must stop the command at start,
not after hours of training. ``os.access`` is not enough: it answers yes to root on a read-only
mount and knows nothing of fsspec URLs, so the check creates and removes a probe file.
Plain stdlib: importable without Lightning.
"""

from __future__ import annotations

import os
import tempfile


class OutputLocationError(ValueError):
    """An output location that cannot be written; the message names it, what it is for and the fix."""


def check_output_dir(path: str, what: str, option: str | None = None, create: bool = True) -> str:
    """Make sure ``path`` is (or can become) a writable local folder; returns its absolute path.

    ``what`` says what goes there ("checkpoints", "adapt results"); ``option`` names the config key or
    flag that sets it, so the error can say how to move it. Folders created here are left in place (the
    caller writes into them next)."""
    fix = f" Set {option} to a writable folder." if option else " Choose a writable folder."
    path = os.path.abspath(os.path.expanduser(str(path)))
    probe = path
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputLocationError(f"the {what} location {path} is a file, not a folder.{fix}")
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise OutputLocationError(f"the {what} location {path} cannot be created: {probe} is a file.{fix}")
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise OutputLocationError(f"the {what} folder {path} cannot be created ({exc.strerror}).{fix}") from None
        target = path
    else:
        target = probe
    try:
        fd, name = tempfile.mkstemp(prefix=".mmalign-write-probe-", dir=target)
        os.close(fd)
        os.remove(name)
    except OSError as exc:
        raise OutputLocationError(f"the {what} folder {target} is not writable ({exc.strerror}).{fix}") from None
    return path
