"""Which normalisation layers adapt, and the statistics BatchNorm normalises with at test time.

The whole model stays in ``eval()`` mode during adaptation, so dropout (and stochastic depth) stay
off. ``PriorNorm`` makes every BatchNorm normalise with statistics that mix a reference (the source
running statistics, or a running estimate that starts there) and the current test batch:
``mu = w * mu_ref + (1 - w) * mu_batch``, ``var = w * var_ref + (1 - w) * var_batch``,
``w = N / (N + n)`` (Schneider et al. 2020). ``w = 0`` is TENT's pure batch statistics.

How: a forward pre-hook standardises the layer's input with the mixed statistics, differentiably (the
batch statistics depend on upstream affine parameters, and TENT's gradient flows through them), and
the layer itself is left to apply its affine map (and, for timm's ``BatchNormAct2d``, its activation)
with running statistics fixed at mean 0, variance 1 and eps 0, which is the identity. The reference
statistics are kept aside and written back for export (``exported``).
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
            raise ValueError(f"adapt.norms={adapt_norms!r}; choose one of {sorted(NORM_TYPES)} or give a list "
                             "of module-name regular expressions.")
        chosen = [(n, m) for n, m in norms if isinstance(m, NORM_TYPES[adapt_norms])]
    else:
        pats = [re.compile(p) for p in adapt_norms]
        chosen = [(n, m) for n, m in norms if any(p.search(n) for p in pats)]
    chosen = [(n, m) for n, m in chosen if getattr(m, "weight", None) is not None or getattr(m, "bias", None) is not None]
    if not chosen:
        names = [n for n, _ in norms][:8]
        raise ValueError(f"adapt.norms={adapt_norms!r} selects no affine norm layer; the model's norm layers "
                         f"are {names}{' ...' if len(norms) > 8 else ''}.")
    return chosen


def norm_affine_params(model: nn.Module, adapt_norms: str | list[str] = "all") -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the chosen norm layers' weights and biases."""
    out = []
    for name, m in select_norm_layers(model, adapt_norms):
        out += [(f"{name}.{k}", p) for k, p in (("weight", m.weight), ("bias", m.bias)) if p is not None]
    return out


class PriorNorm:
    """Every BatchNorm of ``model`` on prior-mixed statistics (see the module docstring).

    ``prior``: N (``NormSpec.prior``), ``momentum``: the reference's step towards each batch,
    applied by ``commit()`` once per test batch (a method may run several forwards per batch).
    """

    def __init__(self, model: nn.Module, prior: float = 0.0, momentum: float = 0.0) -> None:
        self.prior, self.momentum = float(prior), float(momentum)
        self.layers: dict[str, _BatchNorm] = {}
        self.source: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.eps: dict[str, float] = {}
        self._seen: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._force_source = False
        for name, m in model.named_modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                self.layers[name] = m
                self.source[name] = (m.running_mean.detach().clone(), m.running_var.detach().clone())
                self.eps[name] = float(m.eps)
                m.register_forward_pre_hook(self._hook(name))
        self.reset()
        self._neutralise()

    def _neutralise(self) -> None:
        # running stats (0, 1) and eps 0: F.batch_norm in eval mode is then x * weight + bias exactly
        for m in self.layers.values():
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.eps = 0.0

    def _hook(self, name: str):
        def pre(module, args):
            x = args[0]
            dims = [d for d in range(x.dim()) if d != 1]
            n = x.shape[0]
            mu_ref, var_ref = self.ref[name]
            if self._force_source or (n < 2 and self.prior == 0):
                mu, var = mu_ref, var_ref  # a single sample has no variance: the reference alone
            else:
                mu_b = x.mean(dims)
                var_b = x.var(dims, unbiased=False) if x.numel() // x.shape[1] > 1 else torch.zeros_like(mu_b)
                if name not in self._seen:  # values per channel reduce this many elements
                    self._seen[name] = (mu_b.detach(), var_b.detach(), x.numel() // x.shape[1])
                w = 1.0 if self.prior == float("inf") else self.prior / (self.prior + n)
                mu = w * mu_ref.to(x.dtype) + (1 - w) * mu_b if w else mu_b
                var = w * var_ref.to(x.dtype) + (1 - w) * var_b if w else var_b
            shape = [1, -1] + [1] * (x.dim() - 2)
            x = (x - mu.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps[name])
            return (x, *args[1:])

        return pre

    def commit(self) -> None:
        """End of a test batch: move the reference towards that batch's statistics (``momentum``)."""
        if self.momentum > 0:
            for name, (mu_b, var_b, count) in self._seen.items():
                mu, var = self.ref[name]
                # the running variance takes the unbiased batch variance, as BatchNorm's own does
                unbiased = var_b * count / max(count - 1, 1)
                self.ref[name] = ((1 - self.momentum) * mu + self.momentum * mu_b,
                                  (1 - self.momentum) * var + self.momentum * unbiased)
        self._seen.clear()

    def reset_seen(self) -> None:
        """Forget the batch statistics seen since the last commit (a batch predicted without learning)."""
        self._seen.clear()

    def reset(self) -> None:
        """Reference statistics back to the source's."""
        self.ref = {k: (m.clone(), v.clone()) for k, (m, v) in self.source.items()}
        self._seen.clear()

    def to(self, device) -> "PriorNorm":
        self.source = {k: (m.to(device), v.to(device)) for k, (m, v) in self.source.items()}
        self.ref = {k: (m.to(device), v.to(device)) for k, (m, v) in self.ref.items()}
        return self

    @contextlib.contextmanager
    def source_stats(self):
        """Normalise with the reference statistics alone (no batch statistics) inside the block."""
        self._force_source, before = True, self._force_source
        try:
            yield
        finally:
            self._force_source = before
            self._seen.clear()

    @contextlib.contextmanager
    def exported(self):
        """The layers with their reference statistics and eps put back, for reading the state dict (a
        forward inside the block would normalise twice): what a plain copy of the architecture loads."""
        try:
            for name, m in self.layers.items():
                m.running_mean.copy_(self.ref[name][0])
                m.running_var.copy_(self.ref[name][1])
                m.eps = self.eps[name]
            yield
        finally:
            self._neutralise()
