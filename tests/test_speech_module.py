"""Spoken-set generator, speech/text encoders, the SpeechTextAligner losses and evaluation, bad clips.

A tiny spoken set (24 train / 8 test clips, espeak-ng) is generated once per session here; the
shared ``data_root`` fixture only holds shapes/digits.
"""

import io
import json
import os

import numpy as np
import pytest
import torch

from datamodules.audio_text import AudioTextDataModule
from mmalign.speech.model import SpeechTextModel
from mmalign.speech.module import SpeechTextAligner
from mmalign.speech.tokenizer import CharTokenizer

TOWERS = dict(d_model=32, embed_dim=32, speech_layers=1, text_layers=1, heads=2, dropout=0.0)


def tiny(**losses) -> SpeechTextAligner:
    return SpeechTextAligner(towers=TOWERS, features={"n_mels": 40}, losses=losses)


@pytest.fixture(scope="session")
def spoken_root(tmp_path_factory):
    from datamodules.generate.spoken import generate

    root = tmp_path_factory.mktemp("spoken")
    info = generate(str(root), seed=0, num_train=24, num_test=8, shard_size=8)
    info["root"] = str(root)
    return info


def test_generator_writes_split_dirs_with_sizes(spoken_root):
    root = spoken_root["root"]
    assert spoken_root["splits"] == {"train": 24, "test": 8}
    for split, n in spoken_root["splits"].items():
        with open(os.path.join(root, split, "sizes.json")) as f:
            sizes = json.load(f)
        assert sum(sizes.values()) == n
        assert all(os.path.isfile(os.path.join(root, split, name)) and name.startswith(f"{split}-") for name in sizes)
    assert not set(spoken_root["voices"]["train"]) & set(spoken_root["voices"]["test"])


# ------------------------------------------------------------------------------------------ model
def test_encoders_shapes_and_padding_invariance():
    torch.manual_seed(0)
    tok = CharTokenizer()
    for shared in (0, 1):
        for block in ("conformer", "transformer"):
            m = SpeechTextModel(tok.vocab_size, 32, 16, 1, 1, shared, 2, block, n_mels=40, dropout=0.0).eval()
            feats = torch.randn(1, 40, 50)
            alone = m.encode_speech(feats, torch.tensor([50]))
            padded = torch.cat([feats, torch.zeros(1, 40, 23)], -1)  # normalised padding is 0
            batch = m.encode_speech(torch.cat([padded, torch.randn(1, 40, 73)]), torch.tensor([50, 73]))
            assert alone["seq"].shape == (1, 13, 16) and alone["ctc_logits"].shape == (1, 13, tok.vocab_size)
            assert batch["lengths"].tolist() == [13, 19]
            torch.testing.assert_close(batch["emb"][:1], alone["emb"], atol=1e-5, rtol=1e-5)
            tokens = tok(["hello", "hi there"])
            t_alone, t_batch = m.encode_text(tokens[:1, :5]), m.encode_text(tokens)
            torch.testing.assert_close(t_batch["emb"][:1], t_alone["emb"], atol=1e-5, rtol=1e-5)
            assert torch.allclose(t_batch["emb"].norm(dim=-1), torch.ones(2))


def test_module_validates_weights():
    with pytest.raises(ValueError, match="admits collapse"):
        SpeechTextAligner(losses={"contrastive_weight": 0.0, "ctc_weight": 0.0, "consistency_weight": 1.0})
    with pytest.raises(ValueError, match="ctc_weight must be >= 0"):
        SpeechTextAligner(losses={"ctc_weight": -1.0})


def _datamodule(model, root, **kw):
    return AudioTextDataModule(shards={"train": os.path.join(root, "train"), "val": os.path.join(root, "test")},
                               stream={"batch_size": 8, "num_workers": 0}, preprocess=model.preprocess, **kw)


@pytest.mark.parametrize("mode", ["dtw", "soft_dtw"])
def test_all_losses_backpropagate(spoken_root, mode):
    torch.manual_seed(0)
    model = tiny(ctc_weight=1.0, consistency_weight=0.5, consistency_mode=mode)
    dm = _datamodule(model, spoken_root["root"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape[0] == 8  # the tokenizer was handed to the datamodule
    parts, sp, tx = model.losses(batch)
    assert set(parts) == {"contrastive", "ctc", "consistency", "loss"}
    assert all(torch.isfinite(v) for v in parts.values())
    torch.testing.assert_close(parts["loss"], parts["contrastive"] + parts["ctc"] + 0.5 * parts["consistency"])
    parts["loss"].backward()
    for name in ("model.speech.conv1.weight", "model.text.embed.weight", "model.ctc_head.weight", "logit_scale"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the consistency loss alone reaches both towers' projections
    model.zero_grad()
    model.losses(batch)[0]["consistency"].backward()
    assert model.model.text_proj.weight.grad.abs().sum() > 0 and model.model.speech_proj.weight.grad.abs().sum() > 0


def test_fit_and_evaluate_reports_all_metrics(spoken_root):
    import lightning.pytorch as pl

    pl.seed_everything(0)
    model = tiny(ctc_weight=1.0, consistency_weight=1.0, consistency_mode="dtw")
    dm = _datamodule(model, spoken_root["root"])
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    res = model.eval_results["val"]
    for key in ("speech2text_r1", "speech2text_r5", "speech2text_r10", "text2speech_r1", "text2speech_r10",
                "wer", "cer", "onset_error_ms", "onset_baseline_ms", "alignment", "uniformity_speech",
                "uniformity_text", "modality_gap"):
        assert f"val/{key}" in res, key
    assert all(0.0 <= res[f"val/{k}"] <= 1.0 for k in ("speech2text_r1", "text2speech_r5"))
    assert res["val/speech2text_r10"] == 1.0  # fewer than 10 distinct transcripts: every one is "retrieved"
    assert res["val/onset_baseline_ms"] > 0 and np.isfinite(res["val/onset_error_ms"])
    # without a CTC head there is nothing to decode or align
    model2 = tiny()
    pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
               accelerator="cpu").validate(model2, _datamodule(model2, spoken_root["root"]), verbose=False)
    assert "val/wer" not in model2.eval_results["val"] and "val/speech2text_r1" in model2.eval_results["val"]


# -------------------------------------------------------------------------------------- bad clips
def _flac(wave: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), 16000, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="session")
def bad_shard(tmp_path_factory):
    import webdataset as wds

    rng = np.random.default_rng(0)
    good = 0.3 * np.sin(np.arange(8000) * 0.05) + 0.01 * rng.standard_normal(8000)
    cases = {"good": (_flac(good), "the cat"), "silent": (_flac(np.zeros(8000)), "the cat"),
             "long": (_flac(np.tile(good, 5)), "the cat"),  # 2.5 s > max_seconds=2
             "unreadable": (b"not a flac file at all", "the cat"), "oov": (_flac(good), "room 47!")}
    root = tmp_path_factory.mktemp("bad")
    # Two folders: bad audio, and a bad transcript (whose skipping needs the per-sample text check).
    for name, keys in (("audio", ["good", "silent", "long", "unreadable"]), ("text", ["good", "oov"])):
        (root / name).mkdir()
        with wds.TarWriter(str(root / name / "bad-000000.tar")) as w:
            for key in keys:
                audio, text = cases[key]
                w.write({"__key__": key, "flac": audio, "txt": text, "json": json.dumps({"case": key})})
    return str(root)


def _eval_batches(model, shard_dir):
    dm = AudioTextDataModule(shards={"val": shard_dir}, stream={"batch_size": 8, "num_workers": 0},
                             audio={"max_seconds": 2.0}, preprocess=model.preprocess)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    return batches, dm.health.take("val")


def test_bad_audio_clips_are_skipped_and_counted(bad_shard):
    batches, report = _eval_batches(tiny(), os.path.join(bad_shard, "audio"))
    skipped = report.skipped
    reasons = " | ".join(report.reasons)
    kept = [k for b in batches for k in b.get("key", [])]
    assert "good" in kept and not {"silent", "long", "unreadable"} & set(kept)
    assert "(silent)" in reasons and "(too_long)" in reasons and ":unreadable:" in reasons
    assert skipped == 3


def test_out_of_vocabulary_transcript_is_skipped_and_counted(bad_shard):
    # Needs AudioTextDataModule.decode to call the linked tokenizer's ``validate`` (per-sample check):
    # otherwise tokenisation in collate fails the whole batch.
    batches, report = _eval_batches(tiny(), os.path.join(bad_shard, "text"))
    kept = [k for b in batches for k in b.get("key", [])]
    reasons = " | ".join(report.reasons)
    assert kept == ["good"]
    assert "OutOfVocabularyError" in reasons and "'4', '7'" in reasons
    assert report.skipped == 1
