"""``mmalign precompute_teacher``: write a config's teacher features for its training shards."""

from __future__ import annotations


def precompute_teacher(trainer, model, datamodule, out_dir: str = "teacher_features", shard_size: int = 5000,
                       max_batches: int | None = None):
    """Precompute REPA teacher features (image + flip) for the training shards of a config."""
    from .features import write_features

    teacher = getattr(model, "teacher", None)
    if teacher is None:
        raise ValueError("precompute_teacher needs a model with align.mode != none and a teacher network "
                         "(teacher.checkpoint or teacher.name, not teacher.features).")
    # every key, the last partial batch too: training shuffles, so any sample may be drawn
    import dataclasses

    datamodule.cfg.stream = dataclasses.replace(datamodule.cfg.stream, drop_last=False)
    datamodule.setup("fit")
    # the module flips images itself, so the train transform is deterministic: one epoch covers every key
    loader = datamodule.train_dataloader()

    def batches():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            yield batch

    meta = write_features(batches(), teacher.to(model.device), out_dir, grid=model.align_grid, shard_size=shard_size,
                          interpolate=model.cfg.teacher.interpolate_tokens)
    print(f"wrote {meta['num_samples']} samples in {meta['shards']} shard(s) to {out_dir}: {meta['teacher']}")
    return meta


#: the result-folder option the CLI checks before anything is built (mmalign.training.rundirs)
precompute_teacher.outputs = {"out_dir": "precomputed teacher features"}
