"""Loggers the CLI configures by default, and the config record of each segment of a run."""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger

from .rundirs import segment_file


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger, except that a resumed run appends to its ``metrics.csv``.

    Lightning deletes an existing ``metrics.csv`` when the writer starts, so a run resumed into
    its own folder lost every row logged before the interruption. This keeps the file and primes
    the writer with its columns (rows logged after the checkpoint were already dropped by the CLI).
    A resumed segment writes its hyper-parameters to ``hparams.segmentN.yaml``: Lightning would
    replace the first segment's ``hparams.yaml``.
    """

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        hparams_name = segment_file(self.log_dir, "hparams.yaml")
        kept = path + ".resume" if os.path.isfile(path) else None
        if kept:
            os.replace(path, kept)
        try:
            writer = _LightningCSVLogger.experiment.fget(self)
        finally:
            if kept:
                os.replace(kept, path)
        writer.NAME_HPARAMS_FILE = hparams_name
        if kept:
            with open(path, newline="") as f:
                writer.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
        return writer


class SegmentConfigCallback(SaveConfigCallback):
    """Lightning's config saving, except that a run resumed into its folder (``--ckpt_path last`` may
    pick another experiment's run) keeps the earlier records: ``config.yaml`` stays the first
    segment's, the new one goes to ``config.segmentN.yaml``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and trainer.log_dir:
            self.config_filename = segment_file(trainer.log_dir, "config.yaml")
        super().setup(trainer, pl_module, stage)
