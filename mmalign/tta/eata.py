"""EATA (Niu et al., ICML 2022), following the official ``mr-eggplant/EATA`` code (``eata.py``, ``main.py``).

Per batch, from one forward:

1. reliable samples: entropy ``H < E0``, ``E0 = margin * ln C`` (official ``0.4 * ln 1000``);
2. non-redundant among them: ``|cos(softmax(x), m)| < redundancy`` (official 0.05 at 1000 classes;
   by default scaled to ``0.05 * sqrt(1000 / C)``, see ``EataSpec``), ``m`` the moving average of
   the softmax of the samples kept so far (``m <- 0.9 m + 0.1 mean``; the first batch only sets it,
   with every reliable sample, and filters nothing);
3. loss = mean over the kept samples of ``H / exp(H - E0)`` (the weight is a constant), plus the
   anti-forgetting term ``beta * sum F (theta - theta_source)^2``;
4. one step when a sample was kept (otherwise nothing: the official code skips ``backward``).

The diagonal Fisher ``F`` comes from ``fisher_samples`` clean source images before adaptation (the
official code: 2000 images of the clean ImageNet validation set, "original"): per batch of
``fisher_batch`` images, the squared gradient of the mean cross-entropy against the model's own
predictions (no labels), averaged over the batches, with the model normalised as during adaptation.

As in the official code, ``reset()`` restores the weights and optimizer but keeps the moving average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .losses import reliable_entropy
from .methods import TTAMethod


class Eata(TTAMethod):
    name, adapts_norm, trains = "eata", True, True

    def __init__(self, model, cfg=None, fisher: dict[str, torch.Tensor] | None = None):
        super().__init__(model, cfg)
        e = self.cfg.eata
        if e.fisher_beta > 0 and fisher is None:
            raise ValueError("eata needs the Fisher information of the source model (eata.fisher_information) "
                             "from source images: set data.init_args.shards.train, or eata.fisher_beta: 0 to run "
                             "without the regulariser (ETA).")
        missing = [n for n in self.param_names if fisher is not None and n not in fisher]
        if missing:
            raise ValueError(f"the Fisher information has no entry for {missing[:3]}: it belongs to another model "
                             "or another adapt.norms selection.")
        self.fisher = [fisher[n] for n in self.param_names] if fisher is not None else None
        self.probs: torch.Tensor | None = None  # moving average of kept softmax outputs
        self.reliable, self.kept, self.seen = 0, 0, 0

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.seen if self.seen else float("nan")

    def to(self, device):
        if self.fisher is not None:
            self.fisher = [f.to(device) for f in self.fisher]
        if self.probs is not None:
            self.probs = self.probs.to(device)
        return super().to(device)

    def _step(self, images):
        e = self.cfg.eata
        logits = self.model(images)
        ent, reliable, e0 = reliable_entropy(logits, e.margin)
        probs = logits.softmax(-1)
        keep = reliable.clone()
        if self.probs is not None and bool(reliable.any()):
            eps = e.redundancy if e.redundancy is not None else 0.05 * math.sqrt(1000 / logits.shape[-1])
            cos = F.cosine_similarity(self.probs[None], probs[reliable].detach(), dim=1)
            keep[reliable] = cos.abs() < eps
        with torch.no_grad():
            # on the first batch keep == reliable: the average starts from every reliable sample
            new = probs[keep]
            if len(new):
                mean = new.mean(0)
                self.probs = mean if self.probs is None else e.average * self.probs + (1 - e.average) * mean
        n_keep = int(keep.sum())
        self.reliable += int(reliable.sum())
        self.kept += n_keep
        self.seen += len(ent)
        self.last["kept"] = n_keep / len(ent)
        if n_keep == 0:
            self.skipped += 1
            return logits.detach()
        h = ent[keep]
        loss = (h * torch.exp(-(h.detach() - e0))).mean()
        if self.fisher is not None and e.fisher_beta > 0:
            loss = loss + e.fisher_beta * sum((f * (p - p0) ** 2).sum()
                                              for f, p, p0 in zip(self.fisher, self.params, self._initial))
        self._update(loss)
        return logits.detach()


def fisher_information(model, cfg, batches: Iterable[dict], device="cpu") -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the parameters EATA adapts (``cfg.adapt.norms``), on source images, as the
    official code: per batch of ``cfg.eata.fisher_batch``, the squared gradient of the mean cross-entropy
    against the model's own argmax, averaged over the batches, the model normalised as during
    adaptation. ``batches`` yields dicts with ``image`` (labels are not read); at most
    ``cfg.eata.fisher_samples`` images are used."""
    from .methods import Tent

    e = cfg.eata
    probe = Tent(model, cfg).to(device)  # the same parameter selection and normalisation as Eata's
    images, seen = [], 0
    for batch in batches:
        x = batch["image"][: e.fisher_samples - seen]
        images.append(x)
        seen += len(x)
        if seen >= e.fisher_samples:
            break
    if not seen:
        raise ValueError("no source image for EATA's Fisher information: check data.init_args.shards.train.")
    pool = torch.cat(images).to(device)
    sums = [torch.zeros_like(p) for p in probe.params]
    steps = 0
    with torch.inference_mode(False), torch.enable_grad():
        for i in range(0, len(pool), e.fisher_batch):
            x = pool[i:i + e.fisher_batch]
            if len(x) < 2 and steps:
                break  # a last batch of one image has no batch statistics (the official loader has none)
            logits = probe.model(x)
            loss = F.cross_entropy(logits, logits.argmax(-1))
            for s, g in zip(sums, torch.autograd.grad(loss, probe.params)):
                s += g.detach() ** 2
            steps += 1
            probe.norm.reset_seen()
    return {n: s / steps for n, s in zip(probe.param_names, sums)}
