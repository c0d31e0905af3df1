"""Tiny models and configs shared by the TTA tests."""

import os

import torch
from torch import nn

from mmalign.tta.methods import TTAConfig
from mmalign.tta.source import SplitClassifier
from mmalign.tta.specs import AdaptSpec, CafaSpec, EataSpec, FilterSpec, NormSpec, SarSpec


def conf(lr=1e-3, prior=0.0, momentum=0.0, optimizer="adam", sgd_momentum=0.9, norms="all", small_batch="merge",
         filter=None, cafa=None, eata=None, sar=None):
    """A ``TTAConfig``; prior 0 (pure test-batch statistics, TENT's) unless given."""
    return TTAConfig(AdaptSpec(lr=lr, optimizer=optimizer, momentum=sgd_momentum, norms=norms, small_batch=small_batch),
                     NormSpec(prior=prior, momentum=momentum), filter or FilterSpec(), cafa or CafaSpec(),
                     eata or EataSpec(), sar or SarSpec())


def tiny_cnn(num_classes=3, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(dropout),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bn = backbone[1]
    with torch.no_grad():  # non-trivial source statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return SplitClassifier(backbone, nn.Linear(4, num_classes)).eval()


def bn_mlp(d=4, num_classes=3, scale=3.0, seed=0):
    """features = BatchNorm1d(x); logits = Linear(features), weights scaled so entropies spread."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm1d(d)
    head = nn.Linear(d, num_classes)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        head.weight.mul_(scale)
    return SplitClassifier(nn.Sequential(bn), head).eval()


def hand_bn1d(x, gamma, beta, mu_ref, var_ref, prior, eps=1e-5):
    """BatchNorm1d on ``N/(N+n)`` source + ``n/(N+n)`` batch statistics, written out."""
    n = x.shape[0]
    w = prior / (prior + n)
    mu = w * mu_ref + (1 - w) * x.mean(0)
    var = w * var_ref + (1 - w) * ((x - x.mean(0)) ** 2).mean(0)
    return (x - mu) / torch.sqrt(var + eps) * gamma + beta


def entropy(logits):
    p = torch.softmax(logits, -1)
    return -(p * torch.log(p)).sum(-1)


def tiny_checkpoint(path):
    """A small random ImageClassifier checkpoint (resnet18 at width 8, 10 classes)."""
    import lightning

    from mmalign.classify import ImageClassifier

    torch.manual_seed(0)  # the same weights in every test (the guard's decisions depend on them)
    m = ImageClassifier({"name": "resnet18", "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8}},
                        num_classes=10, transform={"image_size": 32})
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)


def image_folder(root, classes=("circle", "square"), per_class=6, labelled=True):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        folder = os.path.join(root, c) if labelled else root
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = (rng.random((32, 32, 3)) * 255).astype("uint8")
            Image.fromarray(img).save(os.path.join(folder, f"{c}_{i}.png"))
    return str(root)


