"""Test-time adaptation (TTA): a source classifier adapted as it meets shifted data.

- ``source``: the model interface (images -> logits, plus penultimate features) and source loading.
- ``norms``: which norm layers adapt; BatchNorm on test-batch statistics.
- ``losses`` / ``methods``: source, norm, tent, tent_filter (wisdom of crowds), cafa in plain torch.
- ``cafa_stats``: CAFA's source class-conditional Gaussians.
- ``domains``: the streams adapted on: ``CorruptionStream`` (the benchmark; the corruptions themselves
  are data, ``datamodules.corruptions``) and ``TargetStream`` (your own shards or image folder).
- ``stream``: the loop that adapts along a stream, and its records.
- ``pipeline``: the adaptation pipeline the ``adapt`` command and the benchmark scripts share.
- ``report`` / ``module`` / ``adapt_command``: outputs, the config's model, ``python -m mmalign adapt``.

Only light classes are imported here (no timm at import).
"""

from .domains import CorruptionStream, TargetStream
from .module import TTAModel

__all__ = ["CorruptionStream", "TTAModel", "TargetStream"]
