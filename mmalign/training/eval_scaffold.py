"""The evaluation scaffold LightningModules share: one set of torchmetrics per validation set.

A module lists its metrics for a split (``build_eval_metrics``) and updates them in its step; the
scaffold creates them at the start of every validation/test epoch (``val`` plus each
``shards.extra_val`` name the datamodule declares), computes and logs them at the end as
``<split>/<key>`` (a metric returning a dict contributes one key per entry), keeps the values in
``eval_results`` (also non-scalar ones, e.g. per-class accuracy), and prints the final validation
numbers after ``fit``. The metrics synchronise across ranks themselves, at ``compute``, which every
rank reaches even when ranks hold different numbers of evaluation batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


class EvalScaffold:
    """Mixin for a ``LightningModule``; override ``build_eval_metrics`` (and optionally the hooks below)."""

    #: keys (after renaming) shown in the progress bar, matched by suffix
    eval_progress_keys: tuple[str, ...] = ()

    def build_eval_metrics(self, split: str) -> dict[str, Metric]:
        """The metrics of one split, by kind (e.g. ``{"retrieval": RetrievalRecall(...)}``)."""
        raise NotImplementedError

    def prepare_eval(self) -> None:
        """Called once per evaluation epoch before the metrics are built (e.g. zero-shot weights)."""

    def eval_key(self, kind: str, key: str) -> str:
        """Name of one computed value inside its split (default: the metric's own key)."""
        return key

    def eval_split_names(self) -> list[str]:
        dm = self.trainer.datamodule if self._trainer is not None else None
        return list(getattr(dm, "val_names", ["val"]))

    def eval_metrics(self, split: str) -> dict[str, Metric]:
        return self._eval_metrics[split]

    def start_eval(self, splits: list[str]) -> None:
        self.prepare_eval()
        self._eval_metrics = {s: {k: m.to(self.device) for k, m in self.build_eval_metrics(s).items()} for s in splits}

    def on_validation_epoch_start(self) -> None:
        self.start_eval(self.eval_split_names())

    def on_test_epoch_start(self) -> None:
        self.start_eval(["test"])

    def on_validation_epoch_end(self) -> None:
        self.end_eval()

    def on_test_epoch_end(self) -> None:
        self.end_eval()

    def end_eval(self) -> dict[str, dict[str, Any]]:
        self.eval_results: dict[str, dict[str, Any]] = {}
        for split, metrics in getattr(self, "_eval_metrics", {}).items():
            values = self.eval_results.setdefault(split, {})
            for kind, metric in metrics.items():
                if not metric.update_called:
                    continue
                out = metric.compute()
                for key, value in (out.items() if isinstance(out, dict) else [(kind, out)]):
                    full = f"{split}/{self.eval_key(kind, key)}"
                    values[full] = value.tolist() if torch.is_tensor(value) else value
                    if torch.is_tensor(value) and value.numel() == 1 or isinstance(value, (int, float)):
                        self.log(full, float(value), prog_bar=full.endswith(self.eval_progress_keys) and
                                 bool(self.eval_progress_keys), add_dataloader_idx=False)
        self._eval_metrics = {}
        return self.eval_results

    def print_final_metrics(self, keep=lambda key: True) -> None:
        """After ``fit``: the last validation values (rank 0), filtered by ``keep``."""
        if not self.trainer.is_global_zero:
            return
        rows = {k: float(v) for values in getattr(self, "eval_results", {}).values() for k, v in values.items()
                if isinstance(v, (int, float)) and keep(k)}
        if rows:
            width = max(len(k) for k in rows)
            print("\nfinal validation metrics")
            for k in sorted(rows):
                print(f"  {k:<{width}}  {rows[k]:.4f}")
