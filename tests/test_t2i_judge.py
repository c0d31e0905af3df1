"""Text-image alignment scoring: the prompt set, prompt accuracy and CLIP score on real shapes images, the CLIP
judge on an mmalign checkpoint."""

import json
import random

import numpy as np
import pytest
import torch

from mmalign.evaluation.text_image import TextImageAlignment
from mmalign.t2i.judge import ClipJudge, alignment_metric, class_weights, load_prompt_set, score_images
from tests._shapes_judge import ShapesJudge


def real_images(per_class: int = 1, seed: int = 0, size: int = 64):
    """Real rendered shapes images (large shapes, random position and background) of every colour x shape
    class, with their class index ``shape * 6 + colour`` (the data's combination id)."""
    from datamodules.generate import encode_image
    from datamodules.generate.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, render
    from datamodules.samples import decode_image_bytes

    rng = random.Random(seed)
    images, classes = [], []
    for _ in range(per_class):
        for s, shape in enumerate(SHAPES):
            for c, colour in enumerate(COLORS):
                attrs = {"shape": shape, "color": colour, "size": "large", "position": rng.choice(list(POSITIONS)),
                         "background": rng.choice(list(BACKGROUNDS))}
                img = decode_image_bytes(encode_image(render(attrs, size, rng), "jpg"))  # as stored in the shards
                images.append(torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1)
                classes.append(s * len(COLORS) + c)
    return torch.stack(images), torch.tensor(classes)


@pytest.fixture(scope="module")
def judged(data_root):
    """The shapes prompt set, real images of every class and the deterministic judge's features of them."""
    prompts = load_prompt_set(f"{data_root}/shapes")
    images, classes = real_images()
    judge = ShapesJudge()
    return prompts, judge, judge.encode_images(images), classes, images


def test_prompt_set_from_the_dataset(data_root):
    prompts = load_prompt_set(f"{data_root}/shapes")
    with open(f"{data_root}/shapes/info.json") as f:
        heldout = set(json.load(f)["heldout_combos"])
    assert len(prompts.classnames) == 36 and prompts.heldout == heldout and len(heldout) == 6
    assert prompts.prompts()[0] == "a red circle" and prompts.groups().sum() == 6
    table = prompts.attribute_table
    assert table["colour"][7] == "green" and table["shape"][7] == "square"  # class 7 = shape 1 x 6 + colour 1


def _metric(judge, prompts, feats, classes, targets):
    metric = TextImageAlignment(class_weights(judge, prompts), prompts.attribute_table)
    texts = [prompts.prompts()[i] for i in targets.tolist()]
    metric.update(feats, judge.encode_texts(texts), targets, prompts.groups()[targets])
    return metric.compute()


def test_prompt_accuracy_is_one_on_real_images_and_chance_on_shuffled_prompts(judged):
    prompts, judge, feats, classes, _ = judged
    out = _metric(judge, prompts, feats, classes, classes)
    for group in ("all", "seen", "heldout"):
        assert out[f"{group}/acc"] == 1.0 and out[f"{group}/acc_colour"] == 1.0 and out[f"{group}/acc_shape"] == 1.0
    assert out["all/clip_score"] == pytest.approx(100.0)
    g = torch.Generator().manual_seed(0)
    shuffled = classes[torch.randperm(len(classes), generator=g)]
    out = _metric(judge, prompts, feats, classes, shuffled)
    assert out["all/acc"] <= 3 / 36  # chance is 1/36
    assert out["all/acc_colour"] <= 0.35 and out["all/acc_shape"] <= 0.35  # chance 1/6 each
    assert out["all/clip_score"] <= 100 * 3 / 36


def test_attribute_accuracy_counts_the_attribute_alone(judged):
    """A prompt of the right shape in the wrong colour scores on shape, not on colour or class."""
    prompts, judge, feats, classes, _ = judged
    wrong_colour = classes // 6 * 6 + (classes % 6 + 1) % 6
    out = _metric(judge, prompts, feats, classes, wrong_colour)
    assert out["all/acc"] == 0.0 and out["all/acc_colour"] == 0.0 and out["all/acc_shape"] == 1.0


def test_score_images_splits_seen_and_heldout(judged):
    prompts, judge, _, classes, images = judged
    held = prompts.groups()[classes].bool()
    out = score_images(judge, prompts, images[~held], classes[~held])
    assert out["seen/acc"] == 1.0 and "heldout/acc" not in out


def test_clip_judge_reads_an_mmalign_checkpoint(tmp_path, data_root):
    """ClipJudge builds the CLIP of an mmalign checkpoint from its recorded architecture; its CLIP score is
    100 x the cosine of the model's own normalised embeddings."""
    from tests._t2i import tiny_clip_checkpoint

    path, clip = tiny_clip_checkpoint(tmp_path / "clip.ckpt", "mmalign-judge-tiny")
    judge = ClipJudge(str(path))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    texts = ["a red circle", "a blue star", "a green cross"]
    img, txt = judge.encode_images(images), judge.encode_texts(texts)
    ref = clip.model.encode_image(torch.nn.functional.interpolate((images + 1) / 2, size=16, mode="bicubic",
                                                                  antialias=True).clamp(0, 1).sub(judge.mean).div(judge.std),
                                  normalize=True)
    torch.testing.assert_close(img, ref, atol=1e-5, rtol=1e-4)
    prompts = load_prompt_set(f"{data_root}/shapes")
    metric = alignment_metric(judge, prompts)
    metric.update(img, txt, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long))
    expected = (100 * (img * txt).sum(-1).clamp_min(0)).mean()
    torch.testing.assert_close(metric.compute()["all/clip_score"], expected)
