"""Callbacks the CLI installs by default: data health, NaN guard, resume overrides."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from mmalign.distributed import all_gather_object

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; raised before the bad update reaches the weights."""


def _healths(trainer) -> list:
    """The ``DataHealth`` objects of the run: the datamodule's, else the loaders' own."""
    dm = trainer.datamodule
    if dm is not None and hasattr(dm, "health"):
        return [dm.health]
    found = []
    loaders = [getattr(trainer.fit_loop, "_combined_loader", None)]
    for combined in loaders:
        for dl in getattr(combined, "flattened", []) or []:
            h = getattr(dl, "health", None)
            if h is not None and all(h is not f for f in found):
                found.append(h)
    return found


class DataHealthMonitor(pl.Callback):
    """Reports samples the datamodule skipped as corrupt, once per epoch and stage.

    The datamodule's loaders count skips into ``datamodule.health`` (nothing travels inside a
    batch); this callback sums them over ranks at epoch end, logs ``data/skipped_<stage>`` and
    warns with example reasons. Nothing is skipped silently.
    """

    def __init__(self, max_reasons: int = 5) -> None:
        self.max_reasons = max_reasons
        self.totals: dict[str, int] = {}  # over the whole run, rank-summed; for tests and reports

    def _report(self, trainer, stage: str) -> None:
        skipped, reasons = 0, []
        for health in _healths(trainer):
            r = health.take(stage)
            skipped, reasons = skipped + r.skipped, reasons + r.reasons
        gathered = all_gather_object((skipped, reasons[: self.max_reasons]))
        total = sum(c for c, _ in gathered)
        examples = [r for _, rs in gathered for r in rs][: self.max_reasons]
        self.totals[stage] = self.totals.get(stage, 0) + total
        if total:
            rank_zero_warn(f"{stage}: skipped {total} corrupt/undecodable sample(s) this epoch "
                           f"(epoch {trainer.current_epoch}). Examples: {examples}")
        for lg in trainer.loggers:
            lg.log_metrics({f"data/skipped_{stage}": float(total)}, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        self._report(trainer, "train")

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            for health in _healths(trainer):
                health.take("val")
            return
        self._report(trainer, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._report(trainer, "test")

    def on_predict_epoch_end(self, trainer, pl_module):
        self._report(trainer, "predict")


class NonFiniteStateError(NonFiniteLossError):
    """A parameter or buffer holds NaN/inf (e.g. a BatchNorm running variance overflowed while the
    loss was still finite); raised instead of writing a checkpoint that could not be resumed."""


def _lower_lr_advice(pl_module) -> str:
    key, lr = optimizer_hparam(getattr(pl_module, "hparams", {}), "lr")
    lower = f"--model.init_args.{key}={lr / 2:g}" if isinstance(lr, (int, float)) else "--model.init_args.lr=..."
    return (f"Resume from the last checkpoint with a lower learning rate (fit -c CONFIG --ckpt_path last {lower}), "
            "gradient clipping (--trainer.gradient_clip_val=1.0) or bf16/fp32 instead of fp16.")


class NaNGuard(pl.Callback):
    """Stops training at the first non-finite loss, before backward, so no bad update is applied
    and the last checkpoint on disk stays the last good one. Parameters and buffers are checked by
    ``RunCheckpoint`` just before each checkpoint is written (``check_finite_state``): a per-step
    check of them would cost a device sync every step."""

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach().float().mean())}) at global step {trainer.global_step}, "
                f"epoch {trainer.current_epoch}. No update was applied. " + _lower_lr_advice(pl_module))


def _state_tensors(module: torch.nn.Module):
    """``(name, tensor)`` of what a checkpoint holds: parameters and persistent floating buffers
    (non-persistent ones, such as open_clip's -inf attention mask, are never saved)."""
    yield from module.named_parameters()
    for prefix, m in module.named_modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set and b.is_floating_point():
                yield (f"{prefix}.{name}" if prefix else name), b


def nonfinite_state(module: torch.nn.Module, exempt: frozenset[str] = frozenset()) -> list[str]:
    """Names of parameters/persistent buffers holding NaN or inf. One fused reduction per device (a
    single host sync when everything is finite); the names are looked up only when something is not."""
    tensors = [(n, t.to_local() if hasattr(t, "to_local") else t) for n, t in _state_tensors(module) if n not in exempt]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in tensors:
        by_device.setdefault(t.device, []).append(t.detach().isfinite().all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return []
    return [n for n, t in tensors if not bool(t.detach().isfinite().all())]


def check_finite_state(trainer, pl_module, exempt: frozenset[str] = frozenset(), collective: bool = True) -> None:
    """Raise ``NonFiniteStateError`` when the module's parameters or buffers hold NaN/inf. With
    ``collective`` every rank decides together (DDP ranks' buffers can differ between forwards)."""
    bad = nonfinite_state(pl_module, exempt)
    ok = not bad
    if collective and trainer.world_size > 1:
        ok = trainer.strategy.reduce_boolean_decision(ok, all=True)
    if ok:
        return
    where = f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}" if bad else "another rank's parameters or buffers"
    raise NonFiniteStateError(
        f"non-finite values in {where} at global step {trainer.global_step}, epoch {trainer.current_epoch} (the loss "
        "was still finite): the checkpoint of this step was NOT written, so the last checkpoint on disk is the last "
        "good one. " + _lower_lr_advice(pl_module))


# hyper-parameters whose new value a resumed run applies to the restored optimizer
_OPTIMIZER_KEYS = ("lr", "weight_decay")


def optimizer_hparam(hparams: Any, name: str) -> tuple[str, Any]:
    """``(option path, value)`` of an optimizer hyper-parameter: top-level (``lr``) or grouped under
    ``optim`` (``optim.lr``, modules whose options are specs); ``(name, None)`` when absent."""
    hp = dict(hparams or {})
    if name in hp:
        return name, hp[name]
    group = hp.get("optim")
    if isinstance(group, dict) and name in group:
        return f"optim.{name}", group[name]
    return name, None


class ResumeOverrides(pl.Callback):
    """On resume, make the optimizer follow the model options given now, not the checkpoint's.

    Lightning restores the optimizer (learning rates, weight decay) and LR scheduler (base rates)
    from the checkpoint, so ``--model.init_args.lr`` on a resumed run would otherwise do nothing.
    A changed ``lr`` rescales every parameter group's current rate, initial rate and the
    scheduler's base rate by new/old, so the schedule's shape continues; a changed
    ``weight_decay`` replaces it in every group that decays.
    """

    def __init__(self) -> None:
        self._old: dict[str, Any] = {}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._old = dict(checkpoint.get("hyper_parameters") or {})

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._old:
            return
        now = dict(pl_module.hparams)
        changes = {}
        for k in _OPTIMIZER_KEYS:
            (_, old), (_, new) = optimizer_hparam(self._old, k), optimizer_hparam(now, k)
            if old is not None and new is not None and old != new:
                changes[k] = (old, new)
        self._old = {}
        if not changes:
            return
        for opt, sched in zip(trainer.optimizers, _schedulers(trainer)):
            if "lr" in changes:
                old, new = changes["lr"]
                ratio = float(new) / float(old) if old else 1.0
                for group in opt.param_groups:
                    group["lr"] *= ratio
                    if "initial_lr" in group:
                        group["initial_lr"] *= ratio
                if sched is not None and hasattr(sched, "base_lrs"):
                    sched.base_lrs = [b * ratio for b in sched.base_lrs]
            if "weight_decay" in changes:
                for group in opt.param_groups:
                    if group.get("weight_decay"):
                        group["weight_decay"] = float(changes["weight_decay"][1])
        if trainer.is_global_zero:
            print("[resume] applied to the restored optimizer: "
                  + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))


def _schedulers(trainer) -> list:
    scheds = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
    return scheds + [None] * (len(trainer.optimizers) - len(scheds))


class PredictionWriter(pl.callbacks.BasePredictionWriter):
    """Writes what ``predict_step`` returns to ``predictions.jsonl`` (one line per sample when the
    output holds per-sample values, else one per batch) in the run folder, so ``predict`` leaves a
    file behind instead of only a return value. Tensors become lists; ranks write their own file."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.written: str | None = None

    def _target(self, trainer) -> str:
        import os

        path = self.path or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.jsonl")
        if trainer.world_size > 1:
            stem, ext = os.path.splitext(path)
            path = f"{stem}.rank{trainer.global_rank}{ext}"
        return path

    def on_predict_start(self, trainer, pl_module) -> None:
        import os

        self.written = self._target(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(self.written)), exist_ok=True)
        open(self.written, "w").close()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        import json

        rows = _rows(prediction)
        with open(self.written, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.written:
            print(f"[predict] wrote {self.written}")


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    return v


def _rows(prediction) -> list[dict]:
    if not isinstance(prediction, dict):
        return [{"output": _plain(prediction)}]
    values = {k: _plain(v) for k, v in prediction.items()}
    lengths = {len(v) for v in values.values() if isinstance(v, list)}
    if len(lengths) != 1:
        return [values]
    n = lengths.pop()
    return [{k: (v[i] if isinstance(v, list) else v) for k, v in values.items()} for i in range(n)]
