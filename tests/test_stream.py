import random

import pytest
import torch

from datamodules import ImageTextDataModule
from datamodules.health import DataHealthError
from datamodules.shards import ShardError
from datamodules.stream import StreamingDataset, StreamingLoader
from tests._data import write_shards
from tests._dist import run_distributed

UNEVEN = [3, 11, 5, 9, 2, 7, 13, 4]  # 54 samples in 8 shards of very different sizes
# 1050 samples in 8 very uneven shards: the case where, with the epoch never advancing, 128 samples
# (2 ranks) or 562 (2 ranks x 2 workers) were never read however many epochs ran
UNEVEN_1050 = [400, 250, 150, 100, 60, 40, 30, 20]


def _read_epoch(directory, rank, world, workers, epoch=0):
    dm = ImageTextDataModule(shards={"train": directory},
                             stream={"batch_size": 4, "num_workers": workers, "shuffle_buffer": 8}, image={"size": 8})
    dm.setup("fit")
    ds = dm._train
    assert (ds.rank, ds.world_size) == (rank, world)
    loader = StreamingLoader(ds, epoch_fn=lambda: epoch, num_workers=workers)
    batches = [b["key"] for b in loader]
    return {"n_batches": len(batches), "len": len(loader), "keys": [k for b in batches for k in b]}


def _ddp_reader(rank, world, directory, workers):
    return _read_epoch(directory, rank, world, workers)


@pytest.mark.distributed
def test_two_ranks_disjoint_and_equal_batches(tmp_path):
    write_shards(str(tmp_path), UNEVEN)
    out = run_distributed(_ddp_reader, 2, (str(tmp_path), 2))
    # 54 samples / (2 ranks * 4) -> 6 batches on every rank, however uneven the shards
    assert [o["n_batches"] for o in out] == [6, 6] == [o["len"] for o in out]
    a, b = (set(o["keys"]) for o in out)
    assert not a & b, "ranks read overlapping samples"
    assert len(a | b) >= 40  # balanced shard assignment: most of the data is seen in one epoch


def test_single_process_epoch_is_seeded(tmp_path):
    write_shards(str(tmp_path), UNEVEN)
    first = _read_epoch(str(tmp_path), 0, 1, 0, epoch=0)["keys"]
    again = _read_epoch(str(tmp_path), 0, 1, 0, epoch=0)["keys"]
    other = _read_epoch(str(tmp_path), 0, 1, 0, epoch=1)["keys"]
    assert first == again and first != other
    assert len(first) == 52 and len(set(first)) == len(first)  # 13 batches of 4, no repeats


def test_in_process_decode_leaves_every_generator_alone(tmp_path, monkeypatch):
    """With num_workers=0 the per-sample seeding runs in the training process: it must not touch a
    device generator (torch.manual_seed re-seeds every CUDA device per sample, never restored, and
    before CUDA starts queues a lazy re-seed with a formatted stack trace per sample)."""
    write_shards(str(tmp_path), [6, 6])
    reseeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeds.append)  # what torch.manual_seed calls
    batches = list(StreamingLoader(_image_dm(str(tmp_path), 0)._train, epoch_fn=lambda: 0, num_workers=0))
    assert len(batches) == 3
    assert reseeds == [], f"decoding re-seeded the CUDA generators {len(reseeds)} times"


def _decode(s):
    return {"key": s["__key__"]}


def _collate(samples):
    return {"key": [s["key"] for s in samples]}


def _keys(paths, rank, world, workers, epoch, batch_size=25, sizes=None):
    n = sum(sizes.values()) if sizes else None
    ds = StreamingDataset(paths, _decode, _collate, batch_size, n // (world * batch_size), sizes=sizes,
                          rank=rank, world_size=world, shuffle_buffer=50)
    return [k for b in StreamingLoader(ds, epoch_fn=lambda: epoch, num_workers=workers) for k in b["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shards_every_sample_seen_across_epochs(tmp_path, workers):
    paths = write_shards(str(tmp_path), UNEVEN_1050, with_image=False)
    sizes = dict(zip(paths, UNEVEN_1050))
    seen, orders = set(), []
    for epoch in range(6):
        per_rank = [_keys(paths, r, 2, workers, epoch, sizes=sizes) for r in range(2)]
        assert not set(per_rank[0]) & set(per_rank[1])
        orders.append(per_rank[0])
        seen |= set(per_rank[0]) | set(per_rank[1])
        if epoch == 0:
            assert len(seen) < 1050  # one epoch cannot read everything (equal batch counts), so
    assert orders[0] != orders[1]  # ...the epoch must re-deal shards and reshuffle,
    assert len(seen) == 1050  # and within a few epochs every sample has been read


def test_balanced_assignment_spreads_samples():
    from mmalign.distributed import StreamSlot, assign_shards

    loads, dealt = [], []
    for reader in range(4):
        mine = assign_shards(UNEVEN_1050, StreamSlot(reader // 2, 2, reader % 2, 2))
        loads.append(sum(UNEVEN_1050[i] for i in mine))
        dealt += mine
    assert sorted(dealt) == list(range(8))  # every shard to exactly one reader
    assert sum(loads) == 1050 and max(loads) == 400 and min(loads) >= 150  # round-robin: 120..460


def test_short_reader_repeats_its_own_shards(tmp_path):
    paths = write_shards(str(tmp_path), [2, 10])
    ds = StreamingDataset(paths, _decode, _collate, batch_size=2, batches_per_rank=3, rank=0, world_size=2,
                          shuffle=False)
    keys = [k for b in StreamingLoader(ds) for k in b["key"]]
    assert len(keys) == 6 and set(keys) <= {"k00000", "k00001"} or set(keys) <= {f"k{i:05d}" for i in range(2, 12)}


def _image_dm(directory, workers, **kw):
    dm = ImageTextDataModule(shards={"train": directory},
                             stream={"batch_size": 4, "num_workers": workers, "shuffle_buffer": 6}, image={"size": 8},
                             **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_mid_epoch_is_bit_exact(tmp_path, workers):
    """An interrupted epoch, resumed from the loader's saved state, yields exactly the batches (keys
    and augmented pixels) of the uninterrupted run, in order."""
    write_shards(str(tmp_path), UNEVEN + [6, 6], corrupt={"k00007", "k00030"})
    full = list(StreamingLoader(_image_dm(str(tmp_path), workers)._train, epoch_fn=lambda: 1, num_workers=workers))
    assert len(full) == 16  # 66 samples // 4
    for consumed in (1, 5, 8):
        first = StreamingLoader(_image_dm(str(tmp_path), workers)._train, epoch_fn=lambda: 1,
                                progress_fn=lambda: consumed, num_workers=workers)
        it = iter(first)
        for _ in range(consumed + 1):  # one batch more than the loop consumed: a prefetch
            next(it)
        state = first.state_dict()
        del it
        resumed = StreamingLoader(_image_dm(str(tmp_path), workers)._train, epoch_fn=lambda: 1, num_workers=workers)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert [b["key"] for b in rest] == [b["key"] for b in full[consumed:]], (workers, consumed)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[consumed:]))
        # the next epoch after a resumed one is a plain epoch again
        assert [b["key"] for b in resumed][:2] != [b["key"] for b in rest][:2]


def test_corrupt_sample_skipped_and_counted(tmp_path):
    write_shards(str(tmp_path), [6, 6], corrupt={"k00003", "k00008"})
    # 12 indexed samples -> 3 batches of 4 = 12 good samples wanted of the 10 there are: the reader
    # passes over its data more than once, so it pulls (and counts) both corrupt samples
    dm = ImageTextDataModule(shards={"train": str(tmp_path), "val": str(tmp_path)},
                             stream={"batch_size": 4, "num_workers": 0}, image={"size": 8})
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert "k00003" not in keys and "k00008" not in keys and len(set(keys)) == 10
    assert all(not k.startswith("__") for b in batches for k in b)  # no bookkeeping inside batches
    report = dm.health.take("train")
    assert 2 <= report.skipped <= 4 and all(any(k in r for r in report.reasons) for k in ("k00003", "k00008"))
    val = list(dm.val_dataloader())
    assert dm.health.take("val").skipped == 2 and sum(len(b["key"]) for b in val) == 10


def test_all_corrupt_eval_batch_is_never_yielded(tmp_path):
    write_shards(str(tmp_path), [2, 2], corrupt={"k00000", "k00001"})
    dm = ImageTextDataModule(shards={"val": str(tmp_path), "max_skip_fraction": 1.0},
                             stream={"batch_size": 2, "num_workers": 0}, image={"size": 8})
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [b["key"] for b in batches] == [["k00002", "k00003"]] and dm.health.take("val").skipped == 2


def test_truncated_shard_counts_lost_samples(tmp_path):
    paths = write_shards(str(tmp_path), [6, 40])
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2])
    sizes = {paths[0]: 6, paths[1]: 40}  # what sizes.json says
    ds = StreamingDataset(paths, _decode, _collate, batch_size=2, batches_per_rank=15, shuffle=False, rank=0,
                          world_size=1, sizes=sizes, max_skip_fraction=1.0)
    loader = StreamingLoader(ds)
    assert len(list(loader)) == 15  # 30 samples: one whole pass over both shards, then some
    report = loader.health.take("train")
    assert report.skipped >= 15, report  # about 20 samples lost with the second half, counted as such
    assert "samples lost" in report.reasons[0]


def test_mostly_corrupt_stream_fails_early(tmp_path):
    write_shards(str(tmp_path), [40, 40], corrupt={f"k{i:05d}" for i in range(80) if i % 10})
    dm = ImageTextDataModule(shards={"train": str(tmp_path)}, stream={"batch_size": 4, "num_workers": 0},
                             image={"size": 8})
    dm.setup("fit")
    with pytest.raises(DataHealthError, match=r"of the \d+ samples it read were unusable.*max_skip_fraction=0.5"):
        list(dm.train_dataloader())


def test_shard_mostly_without_captions_fails_at_setup(tmp_path):
    from webdataset import TarWriter

    from tests._data import png_bytes

    with TarWriter(str(tmp_path / "a.tar")) as w:
        for i in range(20):
            sample = {"__key__": f"k{i:03d}", "png": png_bytes(i)}
            if i < 2:
                sample["txt"] = f"caption {i}"
            w.write(sample)
    dm = ImageTextDataModule(shards={"train": str(tmp_path)}, stream={"batch_size": 4, "num_workers": 0},
                             image={"size": 8})
    with pytest.raises(ShardError, match=r"18 of the 20 samples .* lack a required member"):
        dm.setup("fit")


def test_resampled_gives_requested_epoch_length(tmp_path):
    write_shards(str(tmp_path), [5, 5])
    dm = ImageTextDataModule(shards={"train": str(tmp_path), "samples_per_epoch": 40},
                             stream={"batch_size": 4, "num_workers": 0, "resampled": True}, image={"size": 8})
    dm.setup("fit")
    assert sum(1 for _ in dm.train_dataloader()) == 10


def test_tokenizer_and_transform_come_from_preprocess(tmp_path):
    from datamodules import Preprocess

    write_shards(str(tmp_path), [4])
    pre = Preprocess(train_transform=lambda img: torch.zeros(3, 5, 5),
                     tokenizer=lambda texts: torch.tensor([[len(t)] for t in texts]))
    dm = ImageTextDataModule(shards={"train": str(tmp_path)}, stream={"batch_size": 2, "num_workers": 0},
                             preprocess=pre)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (2, 3, 5, 5) and b["tokens"].tolist() == [[len(t)] for t in b["text"]]
    random.seed(0)


def test_trainer_epochs_differ_and_skips_reported_once_per_epoch(tmp_path, recwarn):
    import lightning.pytorch as pl

    from datamodules import ImageLabelDataModule
    from mmalign.training.callbacks import DataHealthMonitor
    from mmalign.classify import ImageClassifier

    class Recording(ImageClassifier):
        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).extend(batch["key"])
            return super().training_step(batch, batch_idx)

    write_shards(str(tmp_path), [6, 6], corrupt={"k00000", "k00006"})
    dm = ImageLabelDataModule(shards={"train": str(tmp_path)}, stream={"batch_size": 5, "num_workers": 0},
                              label={"num_classes": 3})
    model = Recording({"name": "resnet18", "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8}},
                      num_classes=3, transform={"image_size": 8})
    model.seen = {}
    dm.preprocess = model.preprocess
    health = DataHealthMonitor()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[health])
    trainer.fit(model, dm)
    assert model.seen[0] != model.seen[1] and sorted(model.seen[0]) == sorted(model.seen[1])
    # 2 corrupt samples, counted whenever the stream pulls them: each epoch pulls the 10 good ones,
    # and a corrupt one ordered after the last good one is not reached that epoch
    assert 3 <= health.totals["train"] <= 4
    msgs = [str(w.message) for w in recwarn if "skipped" in str(w.message)]
    assert len(msgs) == 2 and "k00000" in msgs[0]


def test_persistent_workers_follow_the_epoch_and_the_resume_position(tmp_path):
    """Persistent workers keep the dataset copy they started with: the epoch seed and a resume position
    must still reach them (through shared memory), or every epoch would repeat the first one."""
    write_shards(str(tmp_path), [6, 6, 6, 6])
    epoch = [0]
    kept = StreamingLoader(_image_dm(str(tmp_path), 2)._train, epoch_fn=lambda: epoch[0], num_workers=2,
                           persistent_workers=True)
    fresh = StreamingLoader(_image_dm(str(tmp_path), 2)._train, epoch_fn=lambda: epoch[0], num_workers=2)
    seen = []
    for e in range(3):
        epoch[0] = e
        seen.append([b["key"] for b in kept])
        assert seen[-1] == [b["key"] for b in fresh]
    assert seen[0] != seen[1] != seen[2]
    epoch[0] = 1
    first = StreamingLoader(_image_dm(str(tmp_path), 2)._train, epoch_fn=lambda: 1, progress_fn=lambda: 3,
                            num_workers=2)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    del it
    kept.load_state_dict(state)
    assert [b["key"] for b in kept] == seen[1][3:]
