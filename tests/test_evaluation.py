"""Evaluators against brute-force dense computations on tiny data, plus 2-process gloo sync."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmalign.evaluation import (
    ClassSpec,
    EmbeddingGeometry,
    RetrievalRecall,
    ZeroShotAccuracy,
    build_zeroshot_weights,
    default_templates,
    format_prompts,
    load_class_spec,
    packaged_spec_path,
    uniformity,
)
from tests._dist import run_distributed

# ----------------------------------------------------------------------------- brute force


def dense_topk_accuracy(feats, weights, labels, ks):
    sims = F.normalize(feats, dim=-1) @ F.normalize(weights, dim=-1).T
    order = sims.argsort(dim=1, descending=True)
    rank = [(order[i] == labels[i]).nonzero().item() for i in range(len(labels))]  # 0-based
    return {f"top{k}": sum(r < k for r in rank) / len(rank) for k in ks}


def dense_recall(images, texts, text_img, ks):
    """images (I, D), texts (T, D), text_img[t] = row of the image of caption t."""
    sims = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    out = {}
    for k in ks:
        i2t, queries = 0, 0
        for i in range(images.shape[0]):
            positives = {t for t in range(texts.shape[0]) if text_img[t] == i}
            if not positives:
                continue
            queries += 1
            i2t += bool(positives & set(sims[i].argsort(descending=True)[:k].tolist()))
        t2i = sum(text_img[t] in sims[:, t].argsort(descending=True)[:k].tolist() for t in range(texts.shape[0]))
        out[f"i2t_r{k}"] = i2t / queries
        out[f"t2i_r{k}"] = t2i / texts.shape[0]
    return out


def dense_geometry(images, texts):
    x, y = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)

    def unif(z):
        d2 = torch.cdist(z.double(), z.double()).pow(2)
        off = ~torch.eye(len(z), dtype=torch.bool)
        return torch.log(torch.exp(-2 * d2[off]).mean()).item()

    return {
        "alignment": (x - y).pow(2).sum(1).mean().item(),
        "uniformity_image": unif(x),
        "uniformity_text": unif(y),
        "modality_gap": (x.mean(0) - y.mean(0)).norm().item(),
    }


def assert_close_dict(got, want, atol=1e-5):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in want:
        assert float(got[key]) == pytest.approx(float(want[key]), abs=atol), key


def multi_caption_data(seed=0, dim=8):
    """7 images with 0-3 captions each (image 3 has none), ids non-contiguous, texts shuffled."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(7, dim, generator=g)
    counts = [1, 3, 2, 0, 1, 2, 3]
    text_img = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    text_img = text_img[torch.randperm(len(text_img), generator=g)]
    # Captions lie near their image so recall is neither 0 nor 1 everywhere.
    texts = images[text_img] + 1.5 * torch.randn(len(text_img), dim, generator=g)
    image_ids = torch.arange(7) * 10 + 3
    return images, texts, text_img, image_ids


# ----------------------------------------------------------------------------- prompts


def test_format_prompts_both_placeholders_and_literal_braces():
    got = format_prompts(["a photo of a {}.", "{c}, {c}!", "{{x}} {}"], "cat")
    assert got == ["a photo of a cat.", "cat, cat!", "{x} cat"]
    with pytest.raises(TypeError, match="single string"):
        format_prompts("a {}", "cat")


def test_load_class_spec_json_yaml_and_defaults(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"classnames": ["dog", "cat"], "templates": ["a {c}.", "the {}"]}))
    spec = load_class_spec(tmp_path / "a.json")
    assert spec == ClassSpec(("dog", "cat"), ("a {c}.", "the {}"))
    assert spec.prompts(1) == ["a cat.", "the cat"]
    (tmp_path / "b.yaml").write_text("classnames: [dog, cat]\ntemplates:\n  - 'a {c}.'\n  - 'the {}'\n")
    assert load_class_spec(tmp_path / "b.yaml") == spec
    (tmp_path / "c.json").write_text(json.dumps({"classnames": ["dog"]}))
    assert load_class_spec(tmp_path / "c.json").templates == default_templates()
    cifar = load_class_spec(packaged_spec_path("cifar10"))
    assert cifar.num_classes == 10 and len(cifar.templates) > 1


@pytest.mark.parametrize(
    "content, error",
    [
        ({"classnames": [], "templates": ["a {}"]}, "'classnames' is empty"),
        ({"classnames": ["a"], "templates": []}, "'templates' is empty"),
        ({"classnames": ["a"], "templates": ["a photo"]}, "no class-name placeholder"),
        ({"classnames": ["a"], "templates": ["a {name}"]}, "unsupported field"),
        ({"classnames": ["a"], "templates": ["a {"]}, "not a valid format string"),
        ({"classnames": ["a", "a"], "templates": ["{}"]}, "duplicates"),
        ({"classnames": ["a"], "template": ["{}"]}, "unknown keys"),
        ({"templates": ["{}"]}, "missing the 'classnames'"),
        ({"classnames": "abc", "templates": ["{}"]}, "must be a list"),
        (["a"], "expected a mapping"),
    ],
)
def test_load_class_spec_errors(tmp_path, content, error):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=error):
        load_class_spec(path)


def test_load_class_spec_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_class_spec(tmp_path / "nope.json")
    (tmp_path / "x.txt").write_text("{}")
    with pytest.raises(ValueError, match="suffix"):
        load_class_spec(tmp_path / "x.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not parse"):
        load_class_spec(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no packaged prompt file"):
        packaged_spec_path("imagenet-21k-nope")


# ----------------------------------------------------------------------------- zero-shot


class FakeTextEncoder:
    """tokenize: prompt -> row of a fixed table; encode_text: row lookup. Counts calls."""

    def __init__(self, prompts, dim=6):
        self.index = {p: i for i, p in enumerate(sorted(set(prompts)))}
        self.table = torch.randn(len(self.index), dim, generator=torch.Generator().manual_seed(1)) * 3
        self.calls = 0

    def tokenize(self, texts):
        return torch.tensor([self.index[t] for t in texts])

    def encode_text(self, tokens):
        self.calls += 1
        assert not torch.is_grad_enabled()
        return self.table[tokens].requires_grad_(True)  # as if from a trainable encoder


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_zeroshot_weights_match_hand_computation(batch_size):
    classnames, templates = ["cat", "dog", "car"], ["a {}.", "the {c}", "{} photo"]
    enc = FakeTextEncoder([t.format(c, c=c) for c in classnames for t in templates])
    weights = build_zeroshot_weights(enc.encode_text, enc.tokenize, classnames, templates, batch_size=batch_size)
    expected = []
    for c in classnames:
        rows = [enc.table[enc.index[t.format(c, c=c)]] for t in templates]
        mean = sum(r / r.norm() for r in rows) / len(rows)
        expected.append(mean / mean.norm())
    torch.testing.assert_close(weights, torch.stack(expected))
    assert not weights.requires_grad
    assert enc.calls == -(-9 // batch_size)


def test_zeroshot_from_class_spec(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"classnames": ["cat", "dog"], "templates": ["a {}"]}))
    enc = FakeTextEncoder(["a cat", "a dog"])
    metric = ZeroShotAccuracy.from_class_spec(path, enc.encode_text, enc.tokenize, top_k=(1,))
    torch.testing.assert_close(metric.class_weights, F.normalize(enc.table, dim=-1))


def test_zeroshot_accuracy_matches_dense_over_batches():
    g = torch.Generator().manual_seed(0)
    weights, feats = torch.randn(8, 5, generator=g), torch.randn(40, 5, generator=g) * 4
    labels = torch.randint(0, 8, (40,), generator=g)
    metric = ZeroShotAccuracy(weights, top_k=(1, 3, 5), per_class=True)
    for s in range(0, 40, 13):
        metric.update(feats[s:s + 13], labels[s:s + 13])
    out = metric.compute()
    want = dense_topk_accuracy(feats, weights, labels, (1, 3, 5))
    assert_close_dict({k: out[k] for k in ("top1", "top3", "top5")}, want)
    pred = (F.normalize(feats, dim=-1) @ F.normalize(weights, dim=-1).T).argmax(1)
    for c in range(8):
        mask = labels == c
        want = (pred[mask] == c).float().mean() if mask.any() else torch.tensor(float("nan"))
        torch.testing.assert_close(out["per_class_top1"][c], want, equal_nan=True)
    present = [c for c in range(8) if (labels == c).any()]
    assert float(out["mean_per_class_top1"]) == pytest.approx(float(out["per_class_top1"][present].mean()))


def test_zeroshot_fewer_classes_than_k_and_buffer_handling():
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    feats = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(10) % 3
    metric = ZeroShotAccuracy(weights)
    metric.update(feats, labels)
    out = metric.compute()
    assert float(out["top5"]) == 1.0
    assert float(out["top1"]) == pytest.approx(dense_topk_accuracy(feats, weights, labels, (1,))["top1"])
    assert "class_weights" in dict(metric.named_buffers()) and "class_weights" not in metric.state_dict()
    assert metric.to("cpu").class_weights.device.type == "cpu"
    torch.testing.assert_close(metric.logits(feats), 100 * F.normalize(feats, dim=-1) @ F.normalize(weights, dim=-1).T)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        metric.update(feats[:2], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="image_features must be"):
        metric.update(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="top_k"):
        ZeroShotAccuracy(weights, top_k=(0,))


# ----------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_retrieval_several_captions_matches_dense(chunk_size):
    images, texts, text_img, image_ids = multi_caption_data()
    ks = (1, 2, 5, 50)  # 50 exceeds both galleries
    metric = RetrievalRecall(top_k=ks, chunk_size=chunk_size)
    # Images and their captions arrive in different batches, in a shuffled order.
    img_order = torch.tensor([5, 0, 3, 6, 1, 4, 2])
    metric.update(images[img_order[:4]], texts[:6], image_ids[text_img[:6]], image_ids[img_order[:4]])
    metric.update(images[img_order[4:]], texts[6:], image_ids[text_img[6:]], image_ids[img_order[4:]])
    out = metric.compute()
    want = dense_recall(images, texts, text_img.tolist(), ks)
    assert_close_dict(out, want)
    assert float(out["i2t_r50"]) == 1.0 and float(out["t2i_r50"]) == 1.0
    assert 0 < float(out["t2i_r1"]) < 1  # the data is not trivially easy or impossible


def test_retrieval_paired_without_ids_and_duplicate_images():
    g = torch.Generator().manual_seed(4)
    images = torch.randn(9, 6, generator=g)
    texts = images + torch.randn(9, 6, generator=g)
    paired = RetrievalRecall(chunk_size=4)
    paired.update(images[:5], texts[:5])
    paired.update(images[5:], texts[5:])
    want = dense_recall(images, texts, list(range(9)), (1, 5, 10))
    assert_close_dict(paired.compute(), want)

    # A padded sampler repeats images 0 and 1 (with their ids) at the end: counted once.
    with_ids = RetrievalRecall(chunk_size=4)
    with_ids.update(images, texts, torch.arange(9), torch.arange(9))
    with_ids.update(images[:2], texts[:0], torch.arange(0), torch.arange(2))
    assert_close_dict(with_ids.compute(), want)
    strict = RetrievalRecall(allow_duplicate_image_ids=False)
    strict.update(images, texts, torch.arange(9), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0]))
    with pytest.raises(ValueError, match="image ids repeat"):
        strict.compute()


def test_retrieval_errors():
    metric = RetrievalRecall()
    with pytest.raises(ValueError, match="both text_image_ids and image_ids"):
        metric.update(torch.randn(2, 3), torch.randn(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match="lengths must match"):
        metric.update(torch.randn(2, 3), torch.randn(3, 3))
    metric.update(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 7]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="never passed as image_ids"):
        metric.compute()
    mixed = RetrievalRecall()
    mixed.update(torch.randn(2, 3), torch.randn(2, 3))
    mixed.update(torch.randn(2, 3), torch.randn(2, 3), torch.arange(2), torch.arange(2))
    with pytest.raises(RuntimeError, match="one calling convention"):
        mixed.compute()


def test_retrieval_chunks_bound_similarity_memory(monkeypatch):
    """compute never builds a similarity matrix with more rows than chunk_size."""
    images, texts, text_img, image_ids = multi_caption_data()
    metric = RetrievalRecall(chunk_size=2)
    metric.update(images, texts, image_ids[text_img], image_ids)
    seen_rows = []
    real_topk = torch.Tensor.topk

    def spy(self, *args, **kwargs):
        seen_rows.append(self.shape[0])
        return real_topk(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    metric.compute()
    assert seen_rows and max(seen_rows) <= 2


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_geometry_matches_dense(chunk_size):
    g = torch.Generator().manual_seed(5)
    images, texts = torch.randn(11, 4, generator=g) * 2, torch.randn(11, 4, generator=g) + 1
    metric = EmbeddingGeometry(chunk_size=chunk_size)
    metric.update(images[:4], texts[:4])
    metric.update(images[4:], texts[4:])
    assert_close_dict(metric.compute(), dense_geometry(images, texts))
    torch.testing.assert_close(uniformity(F.normalize(images, dim=-1), chunk_size),
                               torch.tensor(dense_geometry(images, texts)["uniformity_image"]))


def test_geometry_reservoir_keeps_pairs_and_exact_sums():
    g = torch.Generator().manual_seed(6)
    images, texts = torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g)
    full = EmbeddingGeometry(max_samples=50)  # cap above N: identical to no cap
    capped = EmbeddingGeometry(max_samples=5, seed=3)
    for s in range(0, 20, 3):
        full.update(images[s:s + 3], texts[s:s + 3])
        capped.update(images[s:s + 3], texts[s:s + 3])
    dense = dense_geometry(images, texts)
    assert_close_dict(full.compute(), dense)
    out = capped.compute()
    for key in ("alignment", "modality_gap"):  # running sums, unaffected by the cap
        assert float(out[key]) == pytest.approx(dense[key], abs=1e-5)
    kept_i, kept_t = capped.image_samples[0], capped.text_samples[0]
    assert kept_i.shape == (5, 4)
    rows = [int((F.normalize(images, dim=-1) - r).norm(dim=1).argmin()) for r in kept_i]
    torch.testing.assert_close(kept_t, F.normalize(texts[rows], dim=-1))  # pairs stay together
    assert len(set(rows)) == 5
    subset = dense_geometry(images[rows], texts[rows])
    assert float(out["uniformity_image"]) == pytest.approx(subset["uniformity_image"])


def test_geometry_reservoir_is_uniform():
    counts = torch.zeros(10)
    x = torch.eye(10)
    for seed in range(300):
        metric = EmbeddingGeometry(max_samples=3, seed=seed)
        for s in range(0, 10, 4):
            metric.update(x[s:s + 4], x[s:s + 4])
        counts += metric.image_samples[0].sum(0)
    freq = counts / 300
    assert torch.all((freq - 0.3).abs() < 0.1), freq


def test_geometry_forward_and_errors():
    g = torch.Generator().manual_seed(7)
    images, texts = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    metric = EmbeddingGeometry(max_samples=100)
    batch_out = metric(images[:4], texts[:4])
    assert_close_dict(batch_out, dense_geometry(images[:4], texts[:4]))
    metric(images[4:], texts[4:])
    assert_close_dict(metric.compute(), dense_geometry(images, texts))
    with pytest.raises(ValueError, match="row i a pair"):
        metric.update(images[:3], texts[:2])
    with pytest.raises(RuntimeError, match="before any"):
        EmbeddingGeometry().compute()
    with pytest.raises(ValueError, match="max_samples"):
        EmbeddingGeometry(max_samples=1)


# ----------------------------------------------------------------------------- distributed


def _shard_worker(rank, world_size, data):
    """Each rank feeds its own uneven shard to all three metrics; compute() syncs inside."""
    zs = ZeroShotAccuracy(data["weights"], top_k=(1, 2, 5), per_class=True)
    zs.update(*data["zs"][rank])
    rr = RetrievalRecall(top_k=(1, 3, 20), chunk_size=2)
    for args in data["rr"][rank]:
        rr.update(*args)
    paired = RetrievalRecall(chunk_size=3)
    paired.update(*data["paired"][rank])
    geo = EmbeddingGeometry(chunk_size=4)
    geo.update(*data["geo"][rank])
    return {name: {k: v.tolist() for k, v in m.compute().items()}
            for name, m in (("zs", zs), ("rr", rr), ("paired", paired), ("geo", geo))}


@pytest.mark.distributed
def test_two_process_sync_equals_single_process():
    g = torch.Generator().manual_seed(8)
    weights, feats = torch.randn(6, 5, generator=g), torch.randn(13, 5, generator=g)
    labels = torch.randint(0, 6, (13,), generator=g)
    images, texts, text_img, image_ids = multi_caption_data(seed=9)
    t_ids = image_ids[text_img]
    p_img = torch.randn(7, 5, generator=g)
    p_txt = p_img + torch.randn(7, 5, generator=g)
    data = {
        "weights": weights,
        "zs": [(feats[:8], labels[:8]), (feats[8:], labels[8:])],
        # Rank 0 holds images 0-4 and the first 5 captions; the rest of the captions (some of
        # rank 0's images) and images 5-6 live on rank 1.
        "rr": [[(images[:5], texts[:5], t_ids[:5], image_ids[:5])],
               [(images[5:], texts[5:], t_ids[5:], image_ids[5:])]],
        "paired": [(p_img[:3], p_txt[:3]), (p_img[3:], p_txt[3:])],
        "geo": [(images[:5], texts[:5]), (images[5:], texts[5:7])],
    }
    results = run_distributed(_shard_worker, world_size=2, args=(data,))
    assert results[0] == results[1]
    got = {name: {k: torch.tensor(v) for k, v in d.items()} for name, d in results[0].items()}

    single = ZeroShotAccuracy(weights, top_k=(1, 2, 5), per_class=True)
    single.update(feats, labels)
    want = single.compute()
    assert_close_dict({k: got["zs"][k] for k in ("top1", "top2", "top5", "mean_per_class_top1")},
                      {k: want[k] for k in ("top1", "top2", "top5", "mean_per_class_top1")})
    torch.testing.assert_close(got["zs"]["per_class_top1"], want["per_class_top1"], equal_nan=True)
    assert_close_dict(got["rr"], dense_recall(images, texts, text_img.tolist(), (1, 3, 20)))
    assert_close_dict(got["paired"], dense_recall(p_img, p_txt, list(range(7)), (1, 5, 10)))
    assert_close_dict(got["geo"], dense_geometry(images, texts[:7]))
