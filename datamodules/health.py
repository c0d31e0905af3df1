"""Data-health bookkeeping: how many samples each stage skipped, and why.

Readers (possibly in DataLoader worker processes) report what they skipped alongside every batch
they hand over; the loaders in ``datamodules.stream`` strip that report off before the batch reaches
a training step and add it here. The datamodule owns one ``DataHealth``; ``mmalign``'s
``DataHealthMonitor`` callback sums it over ranks and reports it once per epoch. Batches never
carry bookkeeping keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_REASONS = 5


class DataHealthError(ValueError):
    """Too much of the data is unusable for training to mean anything; the message says what to fix."""


@dataclass
class SkipReport:
    """Samples skipped while producing one batch (or while loading an evaluation set)."""

    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, n: int, reason: str) -> None:
        self.skipped += n
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)


class DataHealth:
    """Skipped-sample counts per stage (``train``, ``val``, ``test``, ``predict``).

    ``pending`` holds what was counted since the last report (an epoch); ``totals`` the whole run.
    """

    def __init__(self) -> None:
        self.pending: dict[str, SkipReport] = {}
        self.totals: dict[str, int] = {}

    def add(self, stage: str, report: SkipReport | None) -> None:
        if report is None or not report.skipped:
            return
        mine = self.pending.setdefault(stage, SkipReport())
        mine.skipped += report.skipped
        mine.reasons.extend(report.reasons[: max(0, MAX_REASONS - len(mine.reasons))])
        self.totals[stage] = self.totals.get(stage, 0) + report.skipped

    def take(self, stage: str) -> SkipReport:
        """What ``stage`` skipped since the last call (and forget it)."""
        return self.pending.pop(stage, SkipReport())

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.totals = dict(state.get("totals", {}))
