"""Building models offline: timm and open_clip builders, safe weight loading, compilation."""

from __future__ import annotations

from typing import Any


def compile_in_place(module, compile: bool | dict[str, Any]) -> None:
    """``torch.compile`` a module's forward in place (``nn.Module.compile``): parameters and state-dict
    keys stay as they are, so checkpoints load with or without compilation. ``compile`` is ``True``
    (inductor, the default backend) or the keyword arguments of ``torch.compile`` (``{"mode":
    "max-autotune"}``, ``{"backend": "aot_eager"}``, ``{"dynamic": true}``)."""
    if compile is False or compile is None:
        return
    if compile is not True and not isinstance(compile, dict):
        raise ValueError(f"compile must be true, false or a dict of torch.compile arguments, got {compile!r}.")
    import inspect

    import torch

    kwargs = {} if compile is True else dict(compile)
    allowed = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"compile: unknown torch.compile argument(s) {unknown}; allowed: {sorted(allowed)}.")
    module.compile(**kwargs)
