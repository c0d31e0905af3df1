"""SAR (Niu et al., ICLR 2023), following the official ``mr-eggplant/SAR`` code (``sar.py``, ``sam.py``).

Per batch:

1. forward; reliable samples ``H < E0``, ``E0 = margin * ln C`` (official ``0.4 * ln 1000``); the
   gradient ``g`` of their mean entropy;
2. SAM's ascent: ``theta + rho * g / (||g||_2 + 1e-12)`` (``||g||`` over every adapted parameter);
3. a second forward there; among the samples reliable in step 1, those reliable again (``H2 < E0``);
   the gradient of their mean entropy, taken at the perturbed point, updates ``theta`` (back at the
   unperturbed values) with the base optimizer (``adapt.optimizer``; the official code: SGD);
4. model recovery: ``ema <- 0.9 ema + 0.1 * mean H2`` (the first value starts it); when ``ema`` falls
   below ``reset_below`` the weights, optimizer and ``ema`` are reset.

The prediction is step 1's. Where a filter keeps no sample the official code still steps with zero
gradients (momentum moves the weights); here that update is skipped and counted. ``sar.skip_top``
leaves out the top layers the official ``collect_params`` leaves out (a ResNet's ``layer4``, a
ViT-Base's blocks 9-11 and final ``norm``).
"""

from __future__ import annotations

import math

import torch

from .losses import reliable_entropy, softmax_entropy
from .methods import TTAMethod

#: module-name parts the official collect_params skips (ResNet layer4, ViT-Base blocks 9-11, submodules of norm)
TOP_LAYERS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


def _is_top(param_name: str) -> bool:
    """The official rule on the norm layer's module name; its final ``norm`` sits at the top of the
    network, here under the wrapper's prefix (``net.norm``)."""
    module = param_name.rsplit(".", 1)[0]
    return any(t in module for t in TOP_LAYERS) or module == "norm" or module.endswith(".norm")


class Sar(TTAMethod):
    name, adapts_norm, trains = "sar", True, True

    def __init__(self, model, cfg=None):
        super().__init__(model, cfg)
        if self.cfg.sar.skip_top:
            keep = [i for i, n in enumerate(self.param_names) if not _is_top(n)]
            if not keep:
                raise ValueError("sar.skip_top leaves no norm layer to adapt (every selected one is in the top "
                                 "layers); set sar.skip_top: false.")
            for i, p in enumerate(self.params):
                if i not in keep:
                    p.requires_grad_(False)
            self.param_names = [self.param_names[i] for i in keep]
            self.params = [self.params[i] for i in keep]
            self._initial = [self._initial[i] for i in keep]
            self._new_optimizer()
        self.ema: float | None = None
        self.recoveries = 0

    def reset(self):
        super().reset()
        self.ema = None

    def _reset_below(self, num_classes: int) -> float:
        r = self.cfg.sar.reset_below
        return 0.2 * math.log(num_classes) / math.log(1000) if r is None else r

    def _step(self, images):
        s = self.cfg.sar
        logits = self.model(images)
        ent, first, e0 = reliable_entropy(logits, s.margin)
        self.last["kept"] = float(first.float().mean())
        if not bool(first.any()):
            self.skipped += 1
            return logits.detach()
        grads = torch.autograd.grad(ent[first].mean(), self.params)
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
        scale = s.rho / (norm + 1e-12)
        theta = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g * scale)  # climb to the local maximum theta + e(theta)
        ent2 = softmax_entropy(self.model(images))[first]
        second = ent2 < e0
        loss2 = ent2[second].mean() if bool(second.any()) else None
        if loss2 is not None:
            value = float(loss2.detach())
            self.ema = value if self.ema is None else s.average * self.ema + (1 - s.average) * value
        if loss2 is not None:
            self.optimizer.zero_grad(set_to_none=True)
            loss2.backward()
        with torch.no_grad():
            for p, p0 in zip(self.params, theta):
                p.copy_(p0)  # back to theta; the gradient stays the one taken at theta + e(theta)
        if loss2 is None:
            self.skipped += 1
        else:
            self.optimizer.step()
            self.updates += 1
            self.last["loss"] = value
        if self.ema is not None and self.ema < self._reset_below(logits.shape[-1]):
            self.reset()  # model recovery
            self.recoveries += 1
        return logits.detach()
