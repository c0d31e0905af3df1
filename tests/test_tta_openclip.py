"""An mmalign CLIP checkpoint adapted at test time as a zero-shot classifier."""

import json

import torch

from mmalign.contrastive import CLIP
from mmalign.models.weights import load_weights
from mmalign.tta.module import TTAModel

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_clip_checkpoint_adapts_as_zeroshot_classifier(tmp_path):
    torch.manual_seed(0)
    clip = CLIP(model={"name": "mmalign-tta-tiny", "cfg": TINY})
    ckpt = tmp_path / "clip.ckpt"
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams)}, ckpt)
    spec = tmp_path / "classes.json"
    spec.write_text(json.dumps({"classnames": ["red circle", "blue square", "green star"],
                                "templates": ["a photo of a {}.", "a {}."]}))
    tta = TTAModel(source_checkpoint=str(ckpt), zeroshot_classes=str(spec), methods=["source", "tent"],
                   adapt_norms="layernorm")
    assert tta.num_classes == 3
    x = torch.randn(6, 3, 16, 16)
    # source logits are the hand-computed zero-shot logits
    from mmalign.evaluation import build_zeroshot_weights

    clip.model.eval()
    with torch.no_grad():
        w = build_zeroshot_weights(clip.model.encode_text, clip.preprocess.tokenizer,
                                   ["red circle", "blue square", "green star"], ["a photo of a {}.", "a {}."])
        ref = 100 * clip.model.encode_image(x, normalize=True) @ w.T
        assert torch.allclose(tta(x), ref, atol=1e-4)
    methods = tta.build_methods()
    before = {k: v.clone() for k, v in methods["tent"].adapted_state_dict().items()}
    methods["tent"](x)
    after = methods["tent"].adapted_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".ln" in k or "norm" in k for k in changed)
    assert all(k.startswith("backbone.clip.visual.") for k in changed)
    # the adapted weights load back into a CLIP module
    out = tmp_path / "adapted.ckpt"
    torch.save(tta.adapted_checkpoint(methods["tent"]), out)
    again = CLIP(model={"name": "mmalign-tta-tiny", "cfg": TINY})
    load_weights(again.model, str(out), prefix="model.")
    key = next(iter(changed)).removeprefix("backbone.clip.")
    assert torch.equal(again.model.state_dict()[key], after["backbone.clip." + key])
