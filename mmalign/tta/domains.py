"""The data a model adapts on: a sequence of domains, each read once per round in a fixed order.

``DomainStream`` is what the adaptation loop needs (``domain_names`` and ``domain_batches``), with
labelled or unlabelled samples; two sources are built in:

- ``CorruptionStream``: the CIFAR-10-C style benchmark, ``benchmark.dir/{corruption}/{severity}/*.tar``
  written on first use from ``shards.test`` (``datamodules.corrupt``), in the benchmark order; or the
  published CIFAR-10-C / CIFAR-100-C arrays and ImageNet-C folders read as they are
  (``benchmark.layout``, ``datamodules.benchmarks``);
- ``TargetStream``: your own data, tar shards or an image folder (``datamodules.folders``), one
  domain per entry of ``domains`` in the order given, labelled (errors reported) or not
  (predictions written, entropy tracked).

Inside a domain the samples may be permuted by ``stream.seed`` (a fixed permutation: every round and every
method sees the same batches); batches never straddle two domains, so reset-each-shift is exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from dataclasses import dataclass, field
from typing import Literal

from datamodules.base import Preprocess
from datamodules.benchmarks import check_cifar_c, cifar_c_url
from datamodules.eval_sets import EvalLoader, InMemoryDataset
from datamodules.image_label import ImageLabelDataModule
from datamodules.shards import expand_shards
from datamodules.specs import EvalSpec, GenerateSpec, ImageSpec, LabelSpec, ShardsSpec, StreamSpec
from mmalign.specs import coerce, need, one_of, positive

UNLABELLED = -1


@dataclass(frozen=True)
class AdaptStreamSpec:
    """How a domain is read during adaptation.

    Args:
        shuffle: Permute samples inside each domain with ``stream.seed`` (a fixed permutation: every
            round and method sees the same batches). Null: the stream's default (``CorruptionStream``
            shuffles, since shards are often class-sorted; ``TargetStream`` keeps a real stream's order).
        cache_decoded: Keep decoded domains in memory (fast repeated rounds; ~12 KB per 32 px image).
        source_max_samples: Cap on labelled source samples (``shards.train``) for CAFA statistics.
    """

    shuffle: bool | None = None
    cache_decoded: bool = False
    source_max_samples: int = 2000

    def __post_init__(self) -> None:
        positive("adapt.source_max_samples", self.source_max_samples)


@dataclass(frozen=True)
class BenchmarkSpec:
    """A corruption benchmark: one domain per (corruption, severity), in the order given.

    Args:
        dir: Folder of the benchmark (relative to ``shards.data_root``).
        layout: ``shards``: ``<dir>/<corruption>/<severity>/*.tar``, written from ``shards.test`` on first
            use; ``cifar_c``: the published CIFAR-10-C / CIFAR-100-C folder (``<corruption>.npy`` holding
            severities 1..5 in consecutive blocks, plus ``labels.npy``); ``imagenet_c``: the published
            ImageNet-C tree (``<corruption>/<severity>/<wnid>/*.JPEG``; classes = the sorted wnids, or a
            class-index file as ``label.classes``). Both read as they are, never converted.
        corruptions: ``all`` (the 15 benchmark corruptions in benchmark order) or a list, streamed
            in the given order (a published folder may hold more, e.g. ``speckle_noise``: list them).
        severities: Severity or severities (1..5); each corruption visits them in the given order.
        seed: Seed of the corruptions written on first use.
    """

    dir: str = "corrupted"
    layout: Literal["shards", "cifar_c", "imagenet_c"] = "shards"
    corruptions: str | list[str] = "all"
    severities: int | list[int] = 5
    seed: int = 0

    def __post_init__(self) -> None:
        need(bool(self.dir), "benchmark.dir must name a folder.")
        one_of("benchmark.layout", self.layout, ("shards", "cifar_c", "imagenet_c"))
        need(isinstance(self.corruptions, str) or len(self.corruptions) > 0,
             "benchmark.corruptions must be 'all' or name at least one corruption, got [].")
        sev = [self.severities] if isinstance(self.severities, int) else list(self.severities)
        need(bool(sev), "benchmark.severities must name at least one severity (1..5).")
        for s in sev:
            need(isinstance(s, int) and 1 <= s <= 5, f"benchmark.severities must be in 1..5, got {s!r}.")
        positive("benchmark.seed", self.seed, zero=True)

    @property
    def corruption_list(self) -> list[str]:
        from datamodules.corruptions import CORRUPTIONS

        if self.corruptions == "all":
            return list(CORRUPTIONS)
        return [self.corruptions] if isinstance(self.corruptions, str) else list(self.corruptions)

    @property
    def severity_list(self) -> list[int]:
        return [self.severities] if isinstance(self.severities, int) else list(self.severities)


@dataclass(frozen=True)
class TargetSpec:
    """Your own data as the adaptation stream.

    Args:
        domains: Domains in stream order, ``{name: spec}`` (a spec is anything ``shards.train`` takes:
            shard files, a brace pattern, a directory of shards, or an image folder). Null: one domain
            ``target`` holding ``shards.test``.
        labelled: ``auto`` (labelled when every sample of the first domain carries a label: ``.cls``,
            ``label.key``, or a class sub-folder), ``true`` (required; a sample without one is skipped
            and counted) or ``false`` (ignore labels: only predictions and entropy are reported).
    """

    domains: dict[str, str | list[str]] | None = None
    labelled: Literal["auto"] | bool = "auto"

    def __post_init__(self) -> None:
        need(self.labelled in ("auto", True, False), f"target.labelled must be 'auto', true or false, got "
                                                     f"{self.labelled!r}.")
        need(self.domains is None or len(self.domains) > 0,
             "target.domains: give at least one {name: shards} entry, or leave it null to use shards.test.")


#: the flat options of the older TTA streams and where they live now
ADAPT_MOVED = {"shuffle": "adapt.shuffle", "cache_decoded": "adapt.cache_decoded",
               "source_max_samples": "adapt.source_max_samples"}


class DomainStream(ImageLabelDataModule):
    """Base of the adaptation streams: domains held in memory (still encoded), read in order.

    Args:
        shards: ``train`` is the labelled source data CAFA's statistics come from; ``test`` the clean
            test set (see ``StreamingDataModule`` for the rest, and for ``stream``, ``eval``,
            ``generate``, ``preprocess``). ``eval.batch_size`` is the adaptation batch size.
        label, image: See ``ImageLabelDataModule``; ``label.num_classes`` is taken from the model.
        adapt: Order inside a domain, decoded cache, source-sample cap (``AdaptStreamSpec``).
    """

    labelled = True
    default_shuffle = True
    moved_options = {**ImageLabelDataModule.moved_options, **ADAPT_MOVED}

    def __init__(self, shards: ShardsSpec = ShardsSpec(), stream: StreamSpec = StreamSpec(),
                 eval: EvalSpec = EvalSpec(), generate: GenerateSpec | str | None = None,
                 preprocess: Preprocess | None = None, label: LabelSpec = LabelSpec(), image: ImageSpec = ImageSpec(),
                 adapt: AdaptStreamSpec = AdaptStreamSpec()) -> None:
        super().__init__(shards, stream, eval, generate, preprocess, label, image)
        self.cfg.adapt = a = coerce(adapt, AdaptStreamSpec, "adapt")
        self.shuffle = self.default_shuffle if a.shuffle is None else a.shuffle
        self.cache_decoded, self.source_max_samples = a.cache_decoded, a.source_max_samples
        self._raw: dict[str, InMemoryDataset] = {}
        self._decoded: dict[str, dict] = {}

    @property
    def domain_names(self) -> list[str]:
        raise NotImplementedError

    def domain_spec(self, domain: str):
        raise NotImplementedError

    def _dataset(self, domain: str) -> InMemoryDataset:
        if domain not in self._raw:
            urls = expand_shards(self.domain_spec(domain), f"domain {domain}")
            self._raw[domain] = InMemoryDataset(urls, self._decode_eval, self.cfg.eval.max_samples)
            if len(self._raw[domain]) == 0:
                raise ValueError(f"domain {domain} holds no samples.")
        return self._raw[domain]

    def _order(self, n: int, domain_index: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + domain_index)
        return torch.randperm(n, generator=g)

    def domain_batches(self, domain: str, batch_size: int | None = None) -> Iterator[dict]:
        """Batches of one domain in their fixed order: ``image``, ``label`` (``-1`` when unlabelled), ``key``."""
        bs = batch_size or self.eval_batch_size
        index = self.domain_names.index(domain)
        if self.cache_decoded:
            if domain not in self._decoded:
                batches = list(self._loader(domain, 256, torch.arange(len(self._dataset(domain)))))
                self._decoded[domain] = {"image": torch.cat([b["image"] for b in batches]),
                                         "label": torch.cat([b["label"] for b in batches]),
                                         "key": [k for b in batches for k in b["key"]]}
            cached = self._decoded[domain]
            order = self._order(len(cached["label"]), index)
            for i in range(0, len(order), bs):
                idx = order[i:i + bs]
                yield {"image": cached["image"][idx], "label": cached["label"][idx],
                       "key": [cached["key"][j] for j in idx.tolist()]}
            return
        yield from self._loader(domain, bs, self._order(len(self._dataset(domain)), index))

    def _loader(self, domain: str, bs: int, order: torch.Tensor):
        from torch.utils.data import Subset

        ds = Subset(self._dataset(domain), order.tolist())
        return EvalLoader(ds, self.collate, "test", self.health, batch_size=bs, shuffle=False,
                          num_workers=self.num_workers)


class CorruptionStream(DomainStream):
    """Corrupted test domains for test-time adaptation.

    Args:
        shards, stream, eval, generate, preprocess, label, image, adapt: See ``DomainStream``
            (``adapt.shuffle`` defaults to true: shards are often class-sorted, and a single-class batch
            is a label shift TTA was not meant to face). ``shards.test`` is the clean test set
            corrupted on first use.
        benchmark: Folder, corruptions, severities and seed of the benchmark (``BenchmarkSpec``).
    """

    moved_options = {**DomainStream.moved_options, "domains_dir": "benchmark.dir",
                     "corruptions": "benchmark.corruptions", "severities": "benchmark.severities",
                     "corruption_seed": "benchmark.seed"}

    def __init__(self, shards: ShardsSpec = ShardsSpec(), stream: StreamSpec = StreamSpec(),
                 eval: EvalSpec = EvalSpec(), generate: GenerateSpec | str | None = None,
                 preprocess: Preprocess | None = None, label: LabelSpec = LabelSpec(), image: ImageSpec = ImageSpec(),
                 adapt: AdaptStreamSpec = AdaptStreamSpec(), benchmark: BenchmarkSpec = BenchmarkSpec()) -> None:
        super().__init__(shards, stream, eval, generate, preprocess, label, image, adapt)
        from datamodules.corruptions import check_name_severity

        self.cfg.benchmark = b = coerce(benchmark, BenchmarkSpec, "benchmark")
        self.corruptions, self.severities = b.corruption_list, b.severity_list
        if b.layout == "shards":  # written by us: only the corruptions we can write (published files may hold more)
            for c in self.corruptions:
                for s in self.severities:
                    check_name_severity(c, s)
        self.domains_dir = self._rooted(b.dir)
        self.corruption_seed = b.seed

    @property
    def domain_names(self) -> list[str]:
        return [f"{c}/{s}" for c in self.corruptions for s in self.severities]

    def domain_spec(self, domain: str) -> str:
        if self.cfg.benchmark.layout == "cifar_c":
            corruption, _, severity = domain.partition("/")
            return cifar_c_url(self.domains_dir, corruption, int(severity))
        return os.path.join(self.domains_dir, domain)

    def _missing(self) -> list[str]:
        return [d for d in self.domain_names
                if not os.path.isdir(os.path.join(self.domains_dir, d))
                or not any(f.endswith(".tar") for f in os.listdir(os.path.join(self.domains_dir, d)))]

    def prepare_data(self) -> None:
        super().prepare_data()  # generates the built-in clean data when configured
        if self.cfg.benchmark.layout != "shards":
            return  # published benchmark files: read as they are
        missing = self._missing()
        if not missing:
            return
        if self.shards["test"] is None:
            raise FileNotFoundError(f"domains {missing[:3]} are missing under {self.domains_dir!r}. Write them with "
                                    "scripts/make_corrupted.py, or set shards.test to the clean test set.")
        from datamodules.corrupt import corrupt_shards

        corrs = sorted({d.split("/")[0] for d in missing}, key=self.corruptions.index)
        sevs = sorted({int(d.split("/")[1]) for d in missing})
        corrupt_shards(self.shards["test"], self.domains_dir, corrs, sevs, seed=self.corruption_seed, verbose=False)

    def setup(self, stage: str) -> None:
        layout = self.cfg.benchmark.layout
        if layout == "cifar_c":
            check_cifar_c(self.domains_dir, self.corruptions, self.severities)
            return
        missing = self._missing() if layout == "shards" else \
            [d for d in self.domain_names if not os.path.isdir(os.path.join(self.domains_dir, d))]
        if missing:
            fix = ("run prepare_data() or scripts/make_corrupted.py first" if layout == "shards" else
                   "layout imagenet_c reads <dir>/<corruption>/<severity>/<wnid>/*.JPEG; fix benchmark.dir or "
                   "benchmark.corruptions")
            raise FileNotFoundError(f"domains {missing[:3]} are missing under {self.domains_dir!r}; {fix}.")
        if layout == "imagenet_c":  # every domain must index the same wnids (or label.classes maps them)
            self.check_folder_classes({f"domain {d}": self.domain_spec(d) for d in self.domain_names})


class TargetStream(DomainStream):
    """Your own target data as the adaptation stream.

    Args:
        shards, stream, eval, generate, preprocess, label, image, adapt: See ``DomainStream``
            (``adapt.shuffle`` defaults to false here: a real stream keeps its order).
        target: The domains in stream order and whether they are labelled (``TargetSpec``).
    """

    default_shuffle = False
    moved_options = {**DomainStream.moved_options, "domains": "target.domains", "labels": "target.labelled"}

    def __init__(self, shards: ShardsSpec = ShardsSpec(), stream: StreamSpec = StreamSpec(),
                 eval: EvalSpec = EvalSpec(), generate: GenerateSpec | str | None = None,
                 preprocess: Preprocess | None = None, label: LabelSpec = LabelSpec(), image: ImageSpec = ImageSpec(),
                 adapt: AdaptStreamSpec = AdaptStreamSpec(), target: TargetSpec = TargetSpec()) -> None:
        super().__init__(shards, stream, eval, generate, preprocess, label, image, adapt)
        self.cfg.target = t = coerce(target, TargetSpec, "target")
        self._domains = {k: self._rooted(v) for k, v in (t.domains or {}).items()}
        self._labelled: bool | None = None if t.labelled == "auto" else bool(t.labelled)

    @property
    def domain_names(self) -> list[str]:
        return list(self._domains) if self._domains else ["target"]

    def domain_spec(self, domain: str):
        if self._domains:
            return self._domains[domain]
        if self.shards["test"] is None:
            raise ValueError("TargetStream needs target.domains ({name: shards or image folder}) or shards.test.")
        return self.shards["test"]

    @property
    def labelled(self) -> bool:
        if self._labelled is None:
            from datamodules.shards import index_shard

            first = expand_shards(self.domain_spec(self.domain_names[0]), "domain")
            member = "cls" if self.label_key == "cls" else "json"
            indexes = [index_shard(u, ("cls", "json")) for u in first if "://" not in u or u.startswith("folder://")]
            self._labelled = bool(indexes) and all(_has_labels(ix, self.label_key, member) for ix in indexes)
        return self._labelled

    def setup(self, stage: str) -> None:
        self.required = (self.required[0],) if not self.labelled else self.required

    def decode(self, sample: dict, train: bool) -> dict:
        if self.labelled:
            return super().decode(sample, train)
        # unlabelled: the image only; a label the data may carry anyway is ignored
        from datamodules.samples import decode_image_bytes, find_image, read_json
        from datamodules.transforms import default_image_transform

        transform = self.preprocess.eval_transform or default_image_transform(self.image_size, False)
        return {"image": transform(decode_image_bytes(find_image(sample))), "label": UNLABELLED,
                "key": sample["__key__"], "meta": read_json(sample)}


def _has_labels(index, label_key: str, member: str) -> bool:
    if label_key == "cls":
        return index.ext_counts.get("cls", 0) == index.num_samples
    import json

    return all(label_key in json.loads(t.get("json") or "{}") for t in index.texts.values()) and \
        len(index.texts) == index.num_samples
