import random

import torch

from datamodules import ImageTextDataModule
from datamodules.stream import EMPTY, SKIPPED, StreamingDataset, StreamingLoader
from tests._data import write_shards
from tests._dist import run_distributed

UNEVEN = [3, 11, 5, 9, 2, 7, 13, 4]  # 54 samples in 8 shards of very different sizes


def _read_epoch(directory, rank, world, workers, epoch=0):
    dm = ImageTextDataModule(train_shards=directory, batch_size=4, num_workers=workers, shuffle_buffer=8,
                             image_size=8)
    dm.setup("fit")
    ds = dm._train
    assert (ds.rank, ds.world_size) == (rank, world)
    loader = StreamingLoader(ds, epoch_fn=lambda: epoch, num_workers=workers)
    batches = [b["key"] for b in loader]
    return {"n_batches": len(batches), "len": len(loader), "keys": [k for b in batches for k in b]}


def _ddp_reader(rank, world, directory, workers):
    return _read_epoch(directory, rank, world, workers)


def test_two_ranks_disjoint_and_equal_batches(tmp_path):
    write_shards(str(tmp_path), UNEVEN)
    out = run_distributed(_ddp_reader, 2, (str(tmp_path), 2))
    # 54 samples / (2 ranks * 4) -> 6 batches on every rank, however uneven the shards
    assert [o["n_batches"] for o in out] == [6, 6] == [o["len"] for o in out]
    a, b = (set(o["keys"]) for o in out)
    assert not a & b, "ranks read overlapping samples"
    assert len(a | b) >= 30  # most of the data is seen in one epoch


def test_single_process_epoch_is_seeded(tmp_path):
    write_shards(str(tmp_path), UNEVEN)
    first = _read_epoch(str(tmp_path), 0, 1, 0, epoch=0)["keys"]
    again = _read_epoch(str(tmp_path), 0, 1, 0, epoch=0)["keys"]
    other = _read_epoch(str(tmp_path), 0, 1, 0, epoch=1)["keys"]
    assert first == again and first != other
    assert len(first) == 52 and len(set(first)) == len(first)  # 13 batches of 4, no repeats


def _decode(s):
    return {"key": s["__key__"]}


def _collate(samples):
    return {"key": [s["key"] for s in samples]}


def test_short_reader_repeats_its_own_shards(tmp_path):
    paths = write_shards(str(tmp_path), [2, 10])
    ds = StreamingDataset(paths, _decode, _collate, batch_size=2, batches_per_rank=3, rank=0, world_size=2,
                          shuffle=False)
    keys = [k for b in ds for k in b["key"]]
    assert len(keys) == 6 and set(keys) <= {"k00000", "k00001"} or set(keys) <= {f"k{i:05d}" for i in range(2, 12)}


def test_corrupt_sample_skipped_and_counted(tmp_path):
    write_shards(str(tmp_path), [6, 6], corrupt={"k00003", "k00008"})
    # 12 indexed samples -> 2 batches of 5: exactly the 10 good ones, each pass read whole
    dm = ImageTextDataModule(train_shards=str(tmp_path), batch_size=5, num_workers=0, image_size=8,
                             val_shards=str(tmp_path))
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert "k00003" not in keys and "k00008" not in keys and len(set(keys)) == 10
    assert sum(b[SKIPPED] for b in batches) == 2
    assert any("k00003" in r for b in batches for r in b["__skip_reasons__"])
    val = list(dm.val_dataloader())
    assert sum(b[SKIPPED] for b in val) == 2 and sum(len(b.get("key", [])) for b in val) == 10


def test_all_corrupt_eval_batch_is_marked_empty(tmp_path):
    write_shards(str(tmp_path), [2], corrupt={"k00000", "k00001"})
    dm = ImageTextDataModule(val_shards=str(tmp_path), batch_size=2, num_workers=0, image_size=8)
    dm.setup("validate")
    [batch] = list(dm.val_dataloader())
    assert batch[EMPTY] and batch[SKIPPED] == 2


def test_truncated_shard_is_counted_not_fatal(tmp_path):
    paths = write_shards(str(tmp_path), [6, 6])
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2 + 100])
    ds = StreamingDataset(paths, _decode, _collate, batch_size=2, batches_per_rank=5, shuffle=False, rank=0,
                          world_size=1)
    batches = list(ds)
    assert len(batches) == 5 and sum(b[SKIPPED] for b in batches) >= 1


def test_resampled_gives_requested_epoch_length(tmp_path):
    write_shards(str(tmp_path), [5, 5])
    dm = ImageTextDataModule(train_shards=str(tmp_path), batch_size=4, num_workers=0, resampled=True,
                             samples_per_epoch=40, image_size=8)
    dm.setup("fit")
    assert sum(1 for _ in dm.train_dataloader()) == 10


def test_tokenizer_and_transform_come_from_preprocess(tmp_path):
    from datamodules import Preprocess

    write_shards(str(tmp_path), [4])
    pre = Preprocess(train_transform=lambda img: torch.zeros(3, 5, 5),
                     tokenizer=lambda texts: torch.tensor([[len(t)] for t in texts]))
    dm = ImageTextDataModule(train_shards=str(tmp_path), batch_size=2, num_workers=0, preprocess=pre)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (2, 3, 5, 5) and b["tokens"].tolist() == [[len(t)] for t in b["text"]]
    random.seed(0)


def test_fit_reports_skipped_samples_once_per_epoch(tmp_path, recwarn):
    import lightning.pytorch as pl

    from datamodules import ImageLabelDataModule
    from mmalign.callbacks import DataHealthMonitor
    from mmalign.classify import ImageClassifier

    write_shards(str(tmp_path), [6, 6], corrupt={"k00000", "k00006"})
    dm = ImageLabelDataModule(train_shards=str(tmp_path), batch_size=5, num_workers=0, num_classes=3)
    model = ImageClassifier(model_name="resnet18", num_classes=3, image_size=8,
                            model_kwargs={"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8})
    dm.preprocess = model.preprocess
    health = DataHealthMonitor()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[health])
    trainer.fit(model, dm)
    assert health.totals["train"] == 4  # 2 corrupt samples, read once in each of 2 epochs
    msgs = [str(w.message) for w in recwarn if "skipped" in str(w.message)]
    assert len(msgs) == 2 and "k00000" in msgs[0]
