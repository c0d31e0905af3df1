import ctypes.util
import importlib.util
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import soundfile as sf

from datamodules.generate import espeak as synth
from datamodules.generate import spoken
from datamodules.shards import write_shards
from datamodules.audio import check_clip

HAVE_ESPEAK = shutil.which("espeak-ng") is not None and ctypes.util.find_library("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed (apt-get install -y espeak-ng)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_utterance(u, n_words):
    check_clip(u.wave, 16000, max_seconds=10.0)  # not empty, finite, not silent
    assert u.sample_rate == 16000 and u.wave.dtype == np.float32 and u.wave.ndim == 1
    assert np.abs(u.wave).max() > 0.05
    assert len(u.onsets) == len(u.words) == n_words
    assert all(0.0 <= t < u.duration for t in u.onsets)
    assert all(b > a for a, b in zip(u.onsets, u.onsets[1:]))


def test_missing_espeak_error_names_apt_get(monkeypatch):
    def no_lib(*a, **k):
        raise OSError("not found")

    monkeypatch.setattr(synth._Espeak, "_instance", None)
    monkeypatch.setattr(synth.ctypes, "CDLL", no_lib)
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(synth.EspeakUnavailableError, match="apt-get install -y espeak-ng"):
        synth.synthesize("hello")
    with pytest.raises(synth.EspeakUnavailableError, match="apt-get install"):
        synth.synthesize("hello", backend="library")


@needs_espeak
def test_word_and_sentence_onsets_from_events():
    word = synth.synthesize("garden", "en-us+f2", speed=160, pitch=50)
    _check_utterance(word, 1)
    assert word.onset_source == "events" and word.onsets[0] < 0.15
    lead = word.wave[: int(word.onsets[0] * 16000)]
    assert lead.size == 0 or np.abs(lead).max() <= 0.01 * np.abs(word.wave).max()  # silence before it
    text = "the quick brown fox jumps over the lazy dog"
    sent = synth.synthesize(text, "en-gb-x-rp+m3", speed=175, pitch=40)
    _check_utterance(sent, 9)
    assert sent.words == text.split() and sent.onset_source == "events"
    assert sent.onsets[-1] > 0.6 * sent.duration  # onsets spread over the clip, not bunched at 0
    # A word onset sits at the start of the word: the second half of the clip holds later words,
    # so faster speech must give an earlier last onset.
    fast = synth.synthesize(text, "en-gb-x-rp+m3", speed=260, pitch=40)
    assert fast.onsets[-1] < sent.onsets[-1] and fast.duration < sent.duration
    # espeak carries a little state (pitch flutter) from call to call, so a repeat within one
    # process is only near-identical; a fresh process replaying the same calls is bit-identical.
    again = synth.synthesize(text, "en-gb-x-rp+m3", speed=175, pitch=40)
    assert abs(len(again.wave) - len(sent.wave)) < 0.02 * len(sent.wave)
    assert np.max(np.abs(np.subtract(again.onsets, sent.onsets))) < 0.03


@needs_espeak
def test_cli_fallback_estimates_onsets():
    u = synth.synthesize("four seven two nine", "en-us", 150, 50, backend="cli")
    _check_utterance(u, 4)
    assert u.onset_source == "estimated"
    ev = synth.synthesize("four seven two nine", "en-us", 150, 50)
    # Same speech; the silence-gap estimate is crude (~50 ms median error) but must be near.
    assert np.max(np.abs(np.subtract(u.onsets, ev.onsets))) < 0.25


@needs_espeak
def test_bad_voice_and_args():
    with pytest.raises(synth.SynthError, match="no voice"):
        synth.synthesize("hello", "xx-nonexistent")
    with pytest.raises(ValueError, match="speed"):
        synth.synthesize("hello", speed=10)
    with pytest.raises(ValueError, match="empty"):
        synth.synthesize("   ")


def test_splits_disjoint_and_deterministic():
    a, b = spoken.make_splits(0), spoken.make_splits(0)
    assert a == b
    assert not set(a.train_voices) & set(a.test_voices)
    assert set(a.train_voices) | set(a.test_voices) == set(synth.ALL_VOICES)
    for kind in spoken.TEXT_KINDS:
        assert a.train_texts[kind] and a.test_texts[kind]
        assert not set(a.train_texts[kind]) & set(a.test_texts[kind])
    assert len(spoken.WORDS) == len(set(spoken.WORDS)) == 60
    assert spoken.make_splits(1).test_voices != a.test_voices
    # Texts must not contain numerals (read as numbers, breaking the word/onset correspondence).
    assert not any(ch.isdigit() for texts in a.train_texts.values() for t in texts for ch in t)


def test_val_split_is_disjoint_and_leaves_the_test_partition_alone():
    plain, carved = spoken.make_splits(0), spoken.make_splits(0, val_fraction=0.1)
    assert carved.test_voices == plain.test_voices and carved.test_texts == plain.test_texts
    assert carved.val_voices and set(carved.train_voices) | set(carved.val_voices) == set(plain.train_voices)
    assert not set(carved.val_voices) & (set(carved.train_voices) | set(carved.test_voices))
    for kind in spoken.TEXT_KINDS:
        val, train, test = (set(x[kind]) for x in (carved.val_texts, carved.train_texts, carved.test_texts))
        assert val and not val & train and not val & test and val | train == set(plain.train_texts[kind])
    with pytest.raises(ValueError, match="no val split"):
        plain.plan("val")


def _read_tar(path):
    samples = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _write(out, splits, seed=0):
    stats = {}
    sizes = write_shards(str(out), spoken.spoken_samples("test", 5, splits, stats, seed=seed), 2, "test")
    return sizes, stats


@needs_espeak
def test_spoken_samples_roundtrip(tmp_path):
    splits = spoken.make_splits(seed=0)
    sizes, stats = _write(tmp_path, splits)
    assert sizes == {"test-000000.tar": 2, "test-000001.tar": 2, "test-000002.tar": 1}
    assert stats["onset_source"] == {"events": 5}
    test_texts = {t for ts in splits.test_texts.values() for t in ts}
    seen = []
    for shard in sorted(sizes):
        for key, s in _read_tar(tmp_path / shard).items():
            assert set(s) == {"flac", "txt", "json"}
            wave, sr = sf.read(io.BytesIO(s["flac"]), dtype="float32")
            meta = json.loads(s["json"])
            assert sr == meta["sample_rate"] == 16000 and wave.ndim == 1
            assert abs(len(wave) / sr - meta["duration"]) < 1e-3 and np.abs(wave).max() > 0.05
            assert s["txt"].decode() == meta["text"] and meta["text"] in test_texts
            assert meta["voice"] in splits.test_voices and meta["voice"] not in splits.train_voices
            assert len(meta["onsets"]) == len(meta["words"]) and meta["kind"] in spoken.TEXT_KINDS
            assert 130 <= meta["speed"] <= 200 and 30 <= meta["pitch"] <= 70
            seen.append((key, meta["text"], meta["voice"]))
    # Deterministic for a seed.
    again, _ = _write(tmp_path / "again", splits)
    keys = [(k, json.loads(s["json"])["text"], json.loads(s["json"])["voice"])
            for sh in sorted(again) for k, s in _read_tar(tmp_path / "again" / sh).items()]
    assert keys == seen


@needs_espeak
def test_make_spoken_script_writes_the_generated_layout(tmp_path):
    spec = importlib.util.spec_from_file_location("make_spoken", os.path.join(ROOT, "scripts", "make_spoken.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "spoken"
    info = mod.main(["--out", str(out), "--num-train", "4", "--num-test", "2", "--num-seen-voice", "2",
                     "--num-val", "2", "--shard-size", "3", "--seed", "5"])
    on_disk = json.loads((out / "info.json").read_text())
    assert on_disk["dataset"] == "spoken"
    assert on_disk["splits"] == {"train": 4, "test": 2, "test_seen_voice": 2, "val": 2}
    assert not set(on_disk["voices"]["val"]) & (set(on_disk["voices"]["train"]) | set(on_disk["voices"]["test"]))
    assert info["splits"] == on_disk["splits"]
    assert sorted(os.listdir(out / "train")) == ["sizes.json", "train-000000.tar", "train-000001.tar"]
    assert not set(on_disk["voices"]["train"]) & set(on_disk["voices"]["test"])
    # the same folder the datamodule generates: it reads it without generating anything
    from datamodules import AudioTextDataModule

    dm = AudioTextDataModule(shards={"data_root": str(tmp_path), "val": "spoken/test"}, stream={"num_workers": 0},
                             generate="spoken")
    dm.prepare_data()
    dm.setup("validate")
    assert len(dm._eval["validate"]) == 2
