"""The two errors of the data layer that are never skipped: the message says what to change."""

from __future__ import annotations


class ShardError(ValueError):
    """A shard spec or shard content that cannot be used; the message says what to change."""


class DataConfigError(ValueError):
    """The data contradicts the configuration (e.g. a label >= num_classes). Never skipped."""
