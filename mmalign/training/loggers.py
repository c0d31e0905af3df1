"""Loggers the CLI configures by default."""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger, except that a resumed run appends to its ``metrics.csv``.

    Lightning deletes an existing ``metrics.csv`` when the writer starts, so a run resumed into
    its own folder lost every row logged before the interruption. This keeps the file and primes
    the writer with its columns (rows logged after the checkpoint were already dropped by the CLI).
    """

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        kept = path + ".resume" if os.path.isfile(path) else None
        if kept:
            os.replace(path, kept)
        try:
            writer = _LightningCSVLogger.experiment.fget(self)
        finally:
            if kept:
                os.replace(kept, path)
        if kept:
            with open(path, newline="") as f:
                writer.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
        return writer
