"""The no-harm guard and the label-free signals an unlabelled stream reports."""

import math

import pytest
import torch

from mmalign.tta.guard import Guard, batch_signals, class_spread, uniform_histogram_entropy
from mmalign.tta.methods import Norm, Tent
from mmalign.tta.specs import GuardSpec
from mmalign.tta.stream import UNLABELLED, run_stream

from _tta import bn_mlp, conf, tiny_cnn


def test_batch_signals_by_hand():
    p_ref = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    p_ad = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    s = batch_signals(p_ad, p_ref)
    # argmax ref [0, 1, 2, 0], adapted [0, 0, 0, 1]: one of four agrees; top shares 3/4 vs 2/4
    assert s["agreement"] == 0.25 and s["class_gain"] == pytest.approx(0.25)
    h = lambda p: -sum(q * math.log(q) for q in p)  # noqa: E731
    h_ad = (3 * h([0.9, 0.05, 0.05]) + h([0.1, 0.8, 0.1])) / 4
    h_ref = (h([0.7, 0.2, 0.1]) + h([0.1, 0.8, 0.1]) + h([0.2, 0.2, 0.6]) + h([0.6, 0.3, 0.1])) / 4
    assert s["entropy_ratio"] == pytest.approx(h_ad / h_ref, rel=1e-5)


def test_guard_waits_for_warmup_then_trips_on_the_moving_average():
    ref = torch.eye(4).repeat(2, 1) * 0.9 + 0.025  # 8 samples, classes 0..3 twice, confident
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)  # everything class 0
    guard = Guard(GuardSpec(min_agreement=0.5, max_class_gain=0.9, min_entropy_ratio=0.0, average=0.5, warmup=2))
    assert guard.update(ref, ref) is None  # agreement 1.0
    assert guard.update(collapsed, ref) is None  # average 0.5*1 + 0.5*0.25 = 0.625, and still warming up
    # batch 3: 0.5*0.625 + 0.5*0.25 = 0.4375 < 0.5
    reason = guard.update(collapsed, ref)
    assert reason is not None and "agreement" in reason and "0.44" in reason
    assert guard.extremes["agreement"] == pytest.approx(0.4375)
    guard.restart()
    assert guard.update(collapsed, ref) is None and guard.batches == 1
    quiet = Guard(GuardSpec(reset=False, warmup=0))
    assert quiet.update(collapsed, ref) is None and quiet.extremes["agreement"] == 0.25


class RandomStream:
    domain_names = ["a", "b"]

    def __init__(self, labelled=True, batches=6, n=16):
        torch.manual_seed(1)
        self.data = {d: [(torch.randn(n, 3, 5, 5), torch.randint(0, 4, (n,)) if labelled
                          else torch.full((n,), UNLABELLED)) for _ in range(batches)] for d in self.domain_names}

    def domain_batches(self, domain, batch_size=None):
        for x, y in self.data[domain]:
            yield {"image": x, "label": y}


def test_a_collapsing_method_is_reset_and_the_unlabelled_stream_reports_it():
    """TENT at a huge learning rate overturns the un-adapted model's predictions: the guard resets it
    (parameters back to the source's, so its next batch equals the un-adapted one), and the label-free
    signals per domain show the agreement, the entropy and the resets."""
    model = tiny_cnn(num_classes=4)
    preds = []
    guard = Guard(GuardSpec(warmup=2))
    res = run_stream({"norm": Norm(model, conf()), "tent": Tent(model, conf(lr=1.0))}, RandomStream(labelled=False),
                     guards={"tent": guard}, reference=model, baseline=Norm(model, conf()), on_predictions=preds.append)
    assert res.resets, "the guard never fired on a collapsing method"
    first = res.resets[0]
    assert first["method"] == "tent" and "agreement" in first["reason"]
    after = [p for p in preds if p["domain"] == first["domain"]][2 * (first["batch"] + 1):][:2]  # the next batch
    assert [p["method"] for p in after] == ["norm", "tent"] and after[0]["pred"] == after[1]["pred"]
    assert after[0]["confidence"] == pytest.approx(after[1]["confidence"], abs=1e-6)
    sig = res.domain_signals(0)
    assert sig["tent"]["a"]["resets"] >= 1 and sig["norm"]["a"]["resets"] == 0
    assert sig["tent"]["a"]["changed_vs_unadapted_pct"] > 50 and sig["norm"]["a"]["changed_vs_unadapted_pct"] == 0
    assert 0 < sig["norm"]["a"]["agreement_pct"] <= 100 and not math.isnan(sig["tent"]["a"]["entropy_trend"])
    assert not res.labelled


def test_guard_off_lets_the_collapse_run():
    model = tiny_cnn(num_classes=4)
    guard = Guard(GuardSpec(reset=False, warmup=2))
    res = run_stream({"norm": Norm(model, conf()), "tent": Tent(model, conf(lr=1.0))}, RandomStream(labelled=False),
                     guards={"tent": guard}, baseline=Norm(model, conf()))
    assert not res.resets and guard.extremes["agreement"] < 0.5


def test_guard_spec_validation():
    with pytest.raises(ValueError, match=r"guard.min_agreement must be in \[0, 1\], got 1.5"):
        GuardSpec(min_agreement=1.5)
    with pytest.raises(ValueError, match="guard.warmup must be >= 0, got -1"):
        GuardSpec(warmup=-1)


def test_source_fallback_takes_the_batches_whose_statistics_leave_the_model_less_certain():
    """Per batch: when the un-adapted model under test-batch statistics is less certain (mean entropy)
    than the source model, every adapting method predicts that batch with the source statistics and
    learns nothing; otherwise it adapts. The decisions equal an independent comparison per batch."""
    model = tiny_cnn(num_classes=4)
    stream = RandomStream(labelled=True, batches=4)
    for d, (scale, offset) in zip(stream.domain_names, ((1.0, 2.0), (3.0, 0.0))):  # shifts of both kinds
        stream.data[d] = [(x * (scale if i % 2 else 1.0) + (offset if i % 2 else 0.0), y)
                          for i, (x, y) in enumerate(stream.data[d])]
    twin = Norm(model, conf())  # the same statistics as the baseline, outside the loop

    def mean_entropy(logits):
        p = logits.softmax(-1)
        return float(-(p * p.log()).sum(-1).mean())

    expected = [mean_entropy(twin(x)) > mean_entropy(model(x)) for d in stream.domain_names
                for x, _ in stream.data[d]]
    assert any(expected) and not all(expected), "the test needs batches on both sides"
    tent = Tent(model, conf(lr=0.1))
    preds = []
    res = run_stream({"source": Norm(model, conf(prior=math.inf)), "tent": tent}, stream, reference=model,
                     baseline=Norm(model, conf()), fallback=["tent"], on_predictions=preds.append)
    got = [r["fallback"] for r in res.records if r["method"] == "tent"]
    assert got == expected
    assert tent.fallbacks == sum(expected) and tent.updates == len(expected) - sum(expected)
    # before any update, a fallen-back batch is predicted exactly as the source predicts it
    assert expected[0] and preds[0]["method"] == "source" and preds[1]["method"] == "tent"
    assert preds[0]["pred"] == preds[1]["pred"]
    assert preds[0]["confidence"] == pytest.approx(preds[1]["confidence"], abs=1e-6)
    sig = res.domain_signals(0)
    assert sig["tent"]["a"]["source_fallback_batches"] + sig["tent"]["b"]["source_fallback_batches"] == sum(expected)


def test_class_spread_by_hand():
    # 4 samples over 2 of 4 classes, evenly: histogram entropy ln 2; a balanced batch of 4 over 4 classes:
    # the expected entropy of a uniform multinomial histogram, enumerated exactly over all 4^4 label draws
    import itertools

    def h(labels):
        q = [labels.count(c) / len(labels) for c in range(4)]
        return -sum(x * math.log(x) for x in q if x > 0)

    exact = sum(h(list(d)) for d in itertools.product(range(4), repeat=4)) / 4 ** 4
    assert uniform_histogram_entropy(4, 4, draws=20000) == pytest.approx(exact, rel=0.02)
    assert class_spread(torch.tensor([0, 0, 1, 1]), 4) == pytest.approx(math.log(2) / exact, rel=0.02)
    assert class_spread(torch.tensor([3, 3, 3, 3]), 4) == 0.0
    # a shuffled balanced batch scores about 1, a class-sorted one (3 of 10 classes) far below
    balanced = torch.randperm(200) % 10
    assert 0.97 < class_spread(balanced, 10) < 1.03
    assert class_spread(torch.arange(200) // 67, 10) < 0.5


def test_class_spread_rule_falls_back_on_batches_of_few_classes():
    """With ``min_class_spread`` the adapting methods take a batch with the source statistics when the source
    model's predictions on it cover few classes, whatever the entropy comparison says; without it they do
    not. Decided per batch exactly as an independent computation decides it."""
    model = bn_mlp(d=4, num_classes=4)
    torch.manual_seed(3)
    with torch.no_grad():
        pool = torch.randn(4000, 4) * 1.5
        pred = model(pool).argmax(-1)
    assert len(set(pred.tolist())) == 4, "the test needs a source model that predicts every class"
    # one class of a shrunken domain (a class-sorted folder under a shift): the test-batch statistics make
    # the model more certain, which the entropy comparison takes for a real shift
    few = pool[pred == 0] * 0.1
    stream = RandomStream(labelled=True, batches=6, n=32)
    for d in stream.domain_names:
        stream.data[d] = [(few[32 * i:32 * (i + 1)] if (d == "a" and i % 2 == 0) else torch.randn(32, 4) * 1.5, y)
                          for i, (_, y) in enumerate(stream.data[d])]
    twin = Norm(model, conf())

    def mean_entropy(logits):
        p = logits.softmax(-1)
        return float(-(p * p.log()).sum(-1).mean())

    batches = [x for d in stream.domain_names for x, _ in stream.data[d]]
    by_entropy = [mean_entropy(twin(x)) > mean_entropy(model(x)) for x in batches]
    by_spread = [class_spread(model(x).argmax(-1), 4) < 0.5 for x in batches]
    assert any(s and not e for s, e in zip(by_spread, by_entropy)), "the test needs batches only the rule takes"
    assert not all(by_spread), "the test needs batches of many classes too"
    for threshold, expected in ((0.0, by_entropy), (0.5, [e or s for e, s in zip(by_entropy, by_spread)])):
        tent = Tent(model, conf(lr=0.1))
        res = run_stream({"source": Norm(model, conf(prior=math.inf)), "tent": tent}, stream, reference=model,
                         baseline=Norm(model, conf()), fallback=["tent"],
                         min_class_spread=threshold)
        assert [r["fallback"] for r in res.records if r["method"] == "tent"] == expected
    with pytest.raises(ValueError, match="guard.min_class_spread"):
        GuardSpec(min_class_spread=1.5)
