"""The shifted test stream: corruption domains in a fixed order, and the loop that adapts on it.

``CorruptionStream`` reads the folders written by ``scripts/make_corrupted.py``
(``domains_dir/{corruption}/{severity}/*.tar`` + ``manifest.json``), and writes them on first use
from ``test_shards`` when they are missing. Domains come in the order given (default: the
benchmark order of ``datamodules.corruptions.CORRUPTIONS``); inside a domain the samples are
permuted by ``seed`` (a fixed permutation: every round and every method sees the same batches).
Batches never straddle two domains, so reset-each-shift is exact.

``run_stream`` feeds every batch to all methods in lockstep (each batch is decoded once) and
records per-batch errors and adaptation time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from datamodules.image_label import ImageLabelDataModule
from datamodules.eval_sets import EvalLoader, InMemoryDataset

SETTINGS = ("continual", "reset", "episodic")


class CorruptionStream(ImageLabelDataModule):
    """Corrupted test domains for test-time adaptation.

    Args:
        domains_dir: Folder written by ``scripts/make_corrupted.py`` (relative to ``data_root``).
        corruptions: ``all`` (the 15 benchmark corruptions in benchmark order) or a list, streamed
            in the given order.
        severities: Severity or severities (1..5); each corruption visits them in the given order.
        corruption_seed: Seed of the corruptions written on first use.
        shuffle: Permute samples inside each domain with ``seed`` (shards are often class-sorted,
            and a single-class batch is a label shift TTA was not meant to face).
        cache_decoded: Keep decoded domains in memory (fast repeated rounds; ~12 KB per 32 px image).
        source_max_samples: Cap on labelled source samples (``train_shards``) for CAFA statistics.
        **kwargs: ``ImageLabelDataModule``/``StreamingDataModule`` arguments. ``test_shards`` is the
            clean test set corrupted on first use; ``train_shards`` the labelled source data.
    """

    def __init__(self, domains_dir: str, corruptions: str | list[str] = "all", severities: int | list[int] = 5,
                 corruption_seed: int = 0, shuffle: bool = True, cache_decoded: bool = False,
                 source_max_samples: int = 2000, **kwargs) -> None:
        super().__init__(**kwargs)
        from datamodules.corruptions import CORRUPTIONS, check_name_severity

        self.corruptions = list(CORRUPTIONS) if corruptions == "all" else (
            [corruptions] if isinstance(corruptions, str) else list(corruptions))
        self.severities = [severities] if isinstance(severities, int) else list(severities)
        if not self.corruptions or not self.severities:
            raise ValueError("corruptions and severities must name at least one domain.")
        for c in self.corruptions:
            for s in self.severities:
                check_name_severity(c, s)
        self.domains_dir = self._rooted(domains_dir)
        self.corruption_seed, self.shuffle, self.cache_decoded = corruption_seed, shuffle, cache_decoded
        self.source_max_samples = source_max_samples
        self._raw: dict[str, InMemoryDataset] = {}
        self._decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def domain_names(self) -> list[str]:
        return [f"{c}/{s}" for c in self.corruptions for s in self.severities]

    def _missing(self) -> list[str]:
        return [d for d in self.domain_names
                if not os.path.isdir(os.path.join(self.domains_dir, d))
                or not any(f.endswith(".tar") for f in os.listdir(os.path.join(self.domains_dir, d)))]

    def prepare_data(self) -> None:
        super().prepare_data()  # generates the built-in clean data when configured
        missing = self._missing()
        if not missing:
            return
        if self.shards["test"] is None:
            raise FileNotFoundError(f"domains {missing[:3]} are missing under {self.domains_dir!r}. Write them with "
                                    "scripts/make_corrupted.py, or set test_shards to the clean test set.")
        from datamodules.corrupt import corrupt_shards

        corrs = sorted({d.split("/")[0] for d in missing}, key=self.corruptions.index)
        sevs = sorted({int(d.split("/")[1]) for d in missing})
        corrupt_shards(self.shards["test"], self.domains_dir, corrs, sevs, seed=self.corruption_seed, verbose=False)

    def setup(self, stage: str) -> None:
        missing = self._missing()
        if missing:
            raise FileNotFoundError(f"domains {missing[:3]} are missing under {self.domains_dir!r}; run "
                                    "prepare_data() or scripts/make_corrupted.py first.")

    def _dataset(self, domain: str) -> InMemoryDataset:
        if domain not in self._raw:
            from datamodules.shards import expand_shards

            urls = expand_shards(os.path.join(self.domains_dir, domain), f"domain {domain}")
            self._raw[domain] = InMemoryDataset(urls, self._decode_eval, self.max_eval_samples)
            if len(self._raw[domain]) == 0:
                raise ValueError(f"domain {domain} holds no samples.")
        return self._raw[domain]

    def _order(self, n: int, domain_index: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + domain_index)
        return torch.randperm(n, generator=g)

    def domain_batches(self, domain: str, batch_size: int | None = None) -> Iterator[dict]:
        """Batches of one domain in their fixed order (``image``, ``label``)."""
        bs = batch_size or self.eval_batch_size
        index = self.domain_names.index(domain)
        if self.cache_decoded:
            if domain not in self._decoded:
                batches = list(self._loader(domain, 256, torch.arange(len(self._dataset(domain)))))
                self._decoded[domain] = (torch.cat([b["image"] for b in batches]),
                                         torch.cat([b["label"] for b in batches]))
            images, labels = self._decoded[domain]
            order = self._order(len(labels), index)
            for i in range(0, len(order), bs):
                idx = order[i:i + bs]
                yield {"image": images[idx], "label": labels[idx]}
            return
        yield from self._loader(domain, bs, self._order(len(self._dataset(domain)), index))

    def _loader(self, domain: str, bs: int, order: torch.Tensor):
        from torch.utils.data import Subset

        ds = Subset(self._dataset(domain), order.tolist())
        return EvalLoader(ds, self.collate, "test", self.health, batch_size=bs, shuffle=False,
                          num_workers=self.num_workers)


@dataclass
class StreamResult:
    """Per-batch records of one run: parallel lists, one entry per (method, batch)."""

    methods: list[str]
    domains: list[str]
    rounds: int
    setting: str
    records: list[dict] = field(default_factory=list)  # method, round, domain, batch, n, wrong
    seconds: dict[str, float] = field(default_factory=dict)  # adaptation time per method
    images: int = 0  # images seen per method

    def domain_errors(self, round_index: int | None = None) -> dict[str, dict[str, float]]:
        """error % per method and domain, for one round (0-based) or over all rounds."""
        out: dict[str, dict[str, list[int]]] = {m: {d: [0, 0] for d in self.domains} for m in self.methods}
        for r in self.records:
            if round_index is None or r["round"] == round_index:
                acc = out[r["method"]][r["domain"]]
                acc[0] += r["wrong"]
                acc[1] += r["n"]
        return {m: {d: 100.0 * w / n if n else float("nan") for d, (w, n) in doms.items()} for m, doms in out.items()}

    def round_errors(self) -> dict[str, list[float]]:
        """error % per method for each round (all domains pooled)."""
        out = {m: [[0, 0] for _ in range(self.rounds)] for m in self.methods}
        for r in self.records:
            out[r["method"]][r["round"]][0] += r["wrong"]
            out[r["method"]][r["round"]][1] += r["n"]
        return {m: [100.0 * w / n if n else float("nan") for w, n in rs] for m, rs in out.items()}

    def throughput(self) -> dict[str, float]:
        return {m: self.images / s if s > 0 else float("nan") for m, s in self.seconds.items()}


def run_stream(methods: dict, stream: CorruptionStream, setting: str = "continual", rounds: int = 1,
               max_batches: int | None = None, device: str | torch.device = "cpu",
               batch_size: int | None = None, log=None) -> StreamResult:
    """Adapt every method of ``methods`` ({name: TTAMethod}) along the stream, in lockstep.

    ``setting``: ``continual`` (never reset), ``reset`` (reset at every domain shift) or
    ``episodic`` (reset before every batch). ``rounds`` repeats the whole stream (long-term);
    ``max_batches`` caps batches per domain (smoke tests).
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}; choose one of {list(SETTINGS)}.")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    result = StreamResult(list(methods), stream.domain_names, rounds, setting)
    result.seconds = {m: 0.0 for m in methods}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for rnd in range(rounds):
        for domain in stream.domain_names:
            if setting == "reset":
                for m in methods.values():
                    m.reset()
            for b, batch in enumerate(stream.domain_batches(domain, batch_size)):
                if max_batches is not None and b >= max_batches:
                    break
                images, labels = batch["image"].to(device), batch["label"].to(device)
                for name, m in methods.items():
                    sync()
                    t0 = time.perf_counter()
                    if setting == "episodic":
                        m.reset()
                    logits = m(images)
                    wrong = int((logits.argmax(-1) != labels).sum())  # .item() syncs: timing is honest
                    result.seconds[name] += time.perf_counter() - t0
                    result.records.append({"method": name, "round": rnd, "domain": domain, "batch": b,
                                           "n": len(labels), "wrong": wrong})
                result.images += len(labels)
            if log is not None:
                errs = {n: 100.0 * sum(r["wrong"] for r in result.records if r["method"] == n and r["round"] == rnd
                                       and r["domain"] == domain) /
                        max(1, sum(r["n"] for r in result.records if r["method"] == n and r["round"] == rnd
                                   and r["domain"] == domain)) for n in methods}
                log(f"round {rnd + 1}/{rounds} {domain}: " + "  ".join(f"{n} {e:.1f}%" for n, e in errs.items()))
    return result


def check_methods(names: Sequence[str]) -> list[str]:
    from .methods import METHODS

    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise ValueError(f"methods {bad or names!r} invalid; choose from {list(METHODS)}.")
    return list(names)
