"""Checkpoints that keep the work: atomic writes, a final ``last.ckpt``, bounded retention, safe loads.

- ``AtomicCheckpointIO`` writes to a temporary file, fsyncs and renames, so a crash mid-write never
  leaves a truncated checkpoint; fsspec URLs (``s3://...``, ``memory://...``) go through fsspec
  instead of becoming a local folder named ``s3:``. Loads use ``weights_only=True``.
- ``RunCheckpoint`` (the CLI's ``checkpoint:`` group) writes ``last.ckpt`` *before* the step
  checkpoint of the same step (which is then a hard link to it), so ``last.ckpt`` is never older
  than the newest step checkpoint; it writes ``last.ckpt`` at the end of training and on a clean
  interrupt whatever ``every_n_train_steps`` is, and removes ``*.tmp-PID`` files that a killed
  write left behind.
- A checkpoint is written only when every parameter and persistent buffer is finite (the NaN guard
  sees only the loss; a BatchNorm running variance can overflow while the loss is still finite):
  otherwise training stops with ``NonFiniteStateError`` and the last checkpoint stays the last good one.
- Loads go through ``mmalign.models.weights.load_checkpoint_file`` (``weights_only=True``).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from mmalign.models.weights import is_url, load_checkpoint_file

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.tmp-<pid>`` in the same directory, fsync, rename (atomic on POSIX)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if is_url(path):  # object stores write whole objects; fsspec handles the protocol
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = path.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        return load_checkpoint_file(os.fspath(path), map_location=map_location or "cpu")


def remove_orphan_temporaries(directory: str) -> list[str]:
    """Delete ``*.tmp-PID`` files whose writer process is gone (a kill -9 mid-write)."""
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(directory), "*.tmp-*")):
        match = re.search(r"\.tmp-(\d+)$", tmp)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        os.remove(tmp)
        removed.append(tmp)
    if removed:
        log.warning("removed %d unfinished checkpoint write(s) from a killed run: %s", len(removed), removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checkpoint_step(path: str) -> int:
    """The ``global_step`` stored in a checkpoint (-1 if it has none or cannot be read: a damaged copy
    beside good checkpoints must not stop ``--ckpt_path last`` from finding them)."""
    try:
        ck = load_checkpoint_file(path, mmap=True)
    except ValueError as exc:
        log.warning("skipping %s: %s", path, exc)
        return -1
    return int(ck.get("global_step", -1)) if isinstance(ck, dict) else -1


def newest_checkpoint(directory: str) -> str | None:
    """The checkpoint in ``directory`` with the highest step (``last.ckpt`` wins a tie)."""
    paths = sorted(glob.glob(os.path.join(glob.escape(directory), "*.ckpt")))
    if not paths:
        return None
    return max(paths, key=lambda p: (checkpoint_step(p), os.path.basename(p) == "last.ckpt"))


def check_checkpoint_options(options: Any) -> None:
    """Refuse values of the ``checkpoint:`` group that make no sense, by name (the CLI calls this at parse
    time; Lightning would take ``every_n_train_steps: 0`` as "never" and report others under its own names)."""
    get = options.get if hasattr(options, "get") else lambda k, d=None: getattr(options, k, d)
    for key in ("every_n_train_steps", "every_n_epochs"):
        value = get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            unit = "step" if key == "every_n_train_steps" else "epoch-end"
            raise ValueError(f"checkpoint.{key} must be >= 1 (null: no {unit} checkpoints), got {value}.")
    top_k = get("save_top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < -1):
        raise ValueError(f"checkpoint.save_top_k must be >= -1 (-1 keeps every checkpoint, 0 none), got {top_k}.")
    interval = get("train_time_interval")
    if interval is not None and getattr(interval, "total_seconds", lambda: 1)() <= 0:
        raise ValueError(f"checkpoint.train_time_interval must be a positive duration (e.g. 0:30:00), got {interval}.")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with mmalign's guarantees (see the module docstring). Every argument is
    ``ModelCheckpoint``'s; the CLI's defaults keep the newest 3 step checkpoints plus ``last.ckpt``."""

    _last_written_at: int = -1
    _checked_at: int = -1
    _exempt: frozenset[str] = frozenset()

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath and not is_url(self.dirpath) \
                and os.path.isdir(self.dirpath):
            remove_orphan_temporaries(self.dirpath)

    def on_train_start(self, trainer, pl_module) -> None:
        from .callbacks import nonfinite_state

        super().on_train_start(trainer, pl_module)
        # buffers that hold inf by design (a mask) before any update are not a divergence
        self._exempt = frozenset(n for n in nonfinite_state(pl_module) if n not in dict(pl_module.named_parameters()))

    def _check_state(self, trainer, collective: bool = True) -> None:
        from .callbacks import check_finite_state

        if self._checked_at != trainer.global_step:
            check_finite_state(trainer, trainer.lightning_module, self._exempt, collective)
            self._checked_at = trainer.global_step

    def _local(self) -> bool:
        return bool(self.dirpath) and not is_url(self.dirpath)

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        # last first: a kill between the two writes leaves last.ckpt newer, never older
        if self.save_last and self.save_top_k != 0:
            self._save_last_checkpoint(trainer, monitor_candidates)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self.save_last and self._last_written_at == trainer.global_step and self.last_model_path \
                and self.file_exists(self.last_model_path, trainer):
            return  # already written first at this step
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_at = trainer.global_step

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self._check_state(trainer)  # every rank reaches here: the decision is taken together
        last = self.last_model_path
        if (self._local() and self._last_written_at == trainer.global_step and last and filepath != last
                and os.path.isfile(last)):
            if trainer.is_global_zero:  # the same bytes: a hard link costs nothing and is atomic
                tmp = f"{filepath}.tmp-{os.getpid()}"
                try:
                    os.link(last, tmp)
                except OSError:
                    import shutil

                    shutil.copyfile(last, tmp)
                os.replace(tmp, filepath)
            trainer.strategy.barrier("RunCheckpoint.link")
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath
            return
        super()._save_checkpoint(trainer, filepath)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_written_at != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A clean interrupt (Ctrl-C, SIGTERM from a scheduler) keeps the work done so far. Other
        exceptions (a NaN loss, a crash) do not write: the last checkpoint stays the last good one."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        super().on_exception(trainer, pl_module, exception)
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        if not (interrupted and self.save_last and self._local()) or trainer.sanity_checking:
            return
        if self._last_written_at == trainer.global_step or trainer.global_step == 0:
            return
        # Other ranks may be anywhere, so no collective: rank 0 writes its replica (DDP keeps
        # every rank's weights identical; a sharded strategy cannot be saved this way).
        if trainer.is_global_zero and not getattr(trainer.strategy, "_sharded", False) \
                and type(trainer.strategy).__name__ in ("SingleDeviceStrategy", "DDPStrategy"):
            from .callbacks import NonFiniteStateError

            try:
                self._check_state(trainer, collective=False)
            except NonFiniteStateError as exc:
                log.warning("interrupted at step %d; last.ckpt not written: %s", trainer.global_step, exc)
                return
            path = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            self.last_model_path, self._last_written_at = path, trainer.global_step
            log.warning("interrupted at step %d: wrote %s", trainer.global_step, path)
