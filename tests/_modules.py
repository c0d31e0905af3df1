"""LightningModules used by subprocess tests (importable as ``tests._modules`` with the repo on PYTHONPATH)."""

from __future__ import annotations

import hashlib
import json
import os

from mmalign.classify import ImageClassifier


class RecordingClassifier(ImageClassifier):
    """An ``ImageClassifier`` that appends every training batch it steps on to a JSON-lines file:
    the global step, the sample keys and a digest of the pixels (bit-exact comparison of runs).

    Args:
        record: File the lines are appended to (flushed and fsynced per line: the process may be
            killed with SIGKILL at any moment).
        **kwargs: ``ImageClassifier`` arguments.
    """

    def __init__(self, record: str = "batches.jsonl", **kwargs) -> None:
        super().__init__(**kwargs)
        self.record = record

    def training_step(self, batch, batch_idx):
        line = {"step": int(self.global_step), "epoch": int(self.current_epoch), "keys": list(batch["key"]),
                "pixels": hashlib.sha1(batch["image"].cpu().numpy().tobytes()).hexdigest()}
        with open(self.record, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return super().training_step(batch, batch_idx)
