"""Mixins of LightningModules whose options are grouped specs (``mmalign.specs``): reading checkpoints saved
before the options were grouped, and the ``optim.grad_clip`` default. Lightning glue, so it lives here
and not in the spec layer (which imports nothing above it)."""

from __future__ import annotations

from typing import Any

from mmalign.specs import migrate_flat


class ReadsFlatCheckpoints:
    """Mixin (before ``LightningModule``) of a module with ``moved_options``: ``load_from_checkpoint``
    also reads a checkpoint saved before the options were grouped. Lightning passes only the saved
    hyper-parameters that name constructor arguments, so the old flat ones would be dropped silently
    and the defaults built instead; here ``migrate_flat`` moves them into their groups first."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        import os

        if isinstance(checkpoint_path, (str, os.PathLike)) and os.path.isfile(checkpoint_path):
            from mmalign.models.weights import load_checkpoint_file

            raw = load_checkpoint_file(checkpoint_path, mmap=True)
            saved = dict(raw.get("hyper_parameters") or {}) if isinstance(raw, dict) else {}
            moved = migrate_flat(cls, saved)
            kwargs = {**{k: v for k, v in moved.items() if k not in saved or saved[k] != v}, **kwargs}
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]


class ClipsGradients:
    """Mixin of a LightningModule whose ``self.cfg.optim`` is an ``OptimSpec``: ``optim.grad_clip``
    clips the gradient norm when the trainer sets no ``gradient_clip_val`` (which wins when set)."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        val = gradient_clip_val if gradient_clip_val is not None else self.cfg.optim.grad_clip  # type: ignore[attr-defined]
        if val:
            self.clip_gradients(optimizer, gradient_clip_val=val,  # type: ignore[attr-defined]
                                gradient_clip_algorithm=gradient_clip_algorithm or "norm")
