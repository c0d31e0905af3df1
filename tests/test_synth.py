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

from mmalign.speech import synth
from mmalign.speech.features import check_clip

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
    a, b = synth.make_splits(0), synth.make_splits(0)
    assert a == b
    assert not set(a.train_voices) & set(a.test_voices)
    assert set(a.train_voices) | set(a.test_voices) == set(synth.ALL_VOICES)
    for kind in synth.TEXT_KINDS:
        assert a.train_texts[kind] and a.test_texts[kind]
        assert not set(a.train_texts[kind]) & set(a.test_texts[kind])
    assert len(synth.WORDS) == len(set(synth.WORDS)) == 60
    assert synth.make_splits(1).test_voices != a.test_voices
    # Texts must not contain numerals (read as numbers, breaking the word/onset correspondence).
    assert not any(ch.isdigit() for texts in a.train_texts.values() for t in texts for ch in t)


def _read_tar(path):
    samples = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


@needs_espeak
def test_write_split_shards_roundtrip(tmp_path):
    splits = synth.make_splits(seed=0)
    entry = synth.write_split(str(tmp_path), "test", 5, splits, seed=0, shard_size=2)
    assert entry["num_samples"] == 5 and entry["shards"] == [f"test-{i:06d}.tar" for i in range(3)]
    assert entry["onset_source"] == {"events": 5}
    test_texts = {t for ts in splits.test_texts.values() for t in ts}
    seen = []
    for shard in entry["shards"]:
        for key, s in _read_tar(tmp_path / shard).items():
            assert set(s) == {"flac", "txt", "json"}
            wave, sr = sf.read(io.BytesIO(s["flac"]), dtype="float32")
            meta = json.loads(s["json"])
            assert sr == meta["sample_rate"] == 16000 and wave.ndim == 1
            assert abs(len(wave) / sr - meta["duration"]) < 1e-3 and np.abs(wave).max() > 0.05
            assert s["txt"].decode() == meta["text"] and meta["text"] in test_texts
            assert meta["voice"] in splits.test_voices and meta["voice"] not in splits.train_voices
            assert len(meta["onsets"]) == len(meta["words"]) and meta["kind"] in synth.TEXT_KINDS
            assert 130 <= meta["speed"] <= 200 and 30 <= meta["pitch"] <= 70
            seen.append((key, meta["text"], meta["voice"]))
    # Deterministic for a seed.
    again = synth.write_split(str(tmp_path / "again"), "test", 5, splits, seed=0, shard_size=2)
    keys = [(k, json.loads(s["json"])["text"], json.loads(s["json"])["voice"])
            for sh in again["shards"] for k, s in _read_tar(tmp_path / "again" / sh).items()]
    assert keys == seen


@needs_espeak
def test_make_spoken_script(tmp_path):
    spec = importlib.util.spec_from_file_location("make_spoken", os.path.join(ROOT, "scripts", "make_spoken.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "spoken"
    manifest = mod.main(["--out", str(out), "--num-train", "4", "--num-test", "2", "--num-seen-voice", "2",
                         "--shard-size", "3", "--seed", "5"])
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["splits"]["train"]["num_samples"] == 4 and len(on_disk["splits"]["train"]["shards"]) == 2
    assert set(manifest["splits"]) == {"train", "test", "test_seen_voice"}
    train_voices = set(on_disk["splits"]["train"]["voices"])
    assert not train_voices & set(on_disk["splits"]["test"]["voices"])
    assert set(on_disk["splits"]["test_seen_voice"]["voices"]) == train_voices
    for s in sorted(os.listdir(out)):
        assert s == "manifest.json" or s.endswith(".tar")
