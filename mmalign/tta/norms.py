"""Which normalisation layers adapt, and BatchNorm's switch to test-batch statistics.

The whole model stays in ``eval()`` mode during adaptation, so dropout (and stochastic depth) stay
off. BatchNorm is made to normalise with the current batch by dropping its running statistics
(``running_mean = running_var = None``): ``F.batch_norm`` then uses batch statistics even in eval
mode, and nothing is accumulated. The source statistics are kept aside so they can be put back
(``source_stats``) for saving weights or for the documented batch-size-1 fallback.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# timm's BatchNormAct2d / LayerNorm2d / GroupNormAct subclass these, so they are covered too.
NORM_TYPES: dict[str, tuple[type, ...]] = {
    "batchnorm": (_BatchNorm,),
    "layernorm": (nn.LayerNorm,),
    "groupnorm": (nn.GroupNorm,),
}
NORM_TYPES["all"] = tuple(t for ts in NORM_TYPES.values() for t in ts)


def select_norm_layers(model: nn.Module, adapt_norms: str | list[str] = "all") -> list[tuple[str, nn.Module]]:
    """Norm layers whose affine parameters adapt.

    ``adapt_norms``: ``all`` | ``batchnorm`` | ``layernorm`` | ``groupnorm``, or a list of regular
    expressions matched (``re.search``) against the module names of the norm layers, e.g.
    ``["layer4", "^net.bn1$"]``. Layers without affine parameters are skipped.
    """
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES["all"])]
    if isinstance(adapt_norms, str):
        if adapt_norms not in NORM_TYPES:
            raise ValueError(f"adapt_norms={adapt_norms!r}; choose one of {sorted(NORM_TYPES)} or give a list "
                             "of module-name regular expressions.")
        chosen = [(n, m) for n, m in norms if isinstance(m, NORM_TYPES[adapt_norms])]
    else:
        pats = [re.compile(p) for p in adapt_norms]
        chosen = [(n, m) for n, m in norms if any(p.search(n) for p in pats)]
    chosen = [(n, m) for n, m in chosen if getattr(m, "weight", None) is not None or getattr(m, "bias", None) is not None]
    if not chosen:
        names = [n for n, _ in norms][:8]
        raise ValueError(f"adapt_norms={adapt_norms!r} selects no affine norm layer; the model's norm layers "
                         f"are {names}{' ...' if len(norms) > 8 else ''}.")
    return chosen


def norm_affine_params(model: nn.Module, adapt_norms: str | list[str] = "all") -> list[nn.Parameter]:
    params = []
    for _, m in select_norm_layers(model, adapt_norms):
        params += [p for p in (m.weight, m.bias) if p is not None]
    return params


def use_batch_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Make every BatchNorm normalise with test-batch statistics; return the source statistics."""
    saved = {}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            saved[name] = (m.running_mean.detach().clone(), m.running_var.detach().clone())
            m.track_running_stats = False
            m.running_mean, m.running_var = None, None
    return saved


@contextlib.contextmanager
def source_stats(model: nn.Module, saved: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Temporarily normalise BatchNorm with the source running statistics again."""
    modules = dict(model.named_modules())
    try:
        for name, (mean, var) in saved.items():
            m = modules[name]
            m.running_mean, m.running_var = mean.clone(), var.clone()
            m.track_running_stats = True
        yield
    finally:
        for name in saved:
            m = modules[name]
            m.running_mean, m.running_var = None, None
            m.track_running_stats = False
