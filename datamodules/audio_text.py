"""Speech/audio-text shards: ``.flac``/``.wav`` + ``.txt`` + ``.json`` (onsets, voice, ...)."""

from __future__ import annotations

import torch

from mmalign.specs import coerce

from .base import Preprocess, StreamingDataModule
from .specs import BASE_MOVED, AudioSpec, EvalSpec, GenerateSpec, ShardsSpec, StreamSpec
from .audio import AUDIO_EXTS, check_clip, decode_audio_bytes
from .samples import read_json

class AudioTextDataModule(StreamingDataModule):
    """Batches: ``audio`` (B,T) zero-padded, ``audio_lengths`` (B,), ``text`` list, ``tokens`` when a
    tokenizer is linked, ``key``, ``meta``.

    Bad clips (empty, silent, non-finite, longer than ``max_seconds``, unreadable) are skipped
    and counted like any corrupt sample.

    Args:
        shards, stream, eval, generate, preprocess: See ``StreamingDataModule``.
        audio: Sample rate, longest clip, silence threshold (``AudioSpec``).
    """

    required = (AUDIO_EXTS, ("txt",))
    moved_options = {**BASE_MOVED, **{k: f"audio.{k}" for k in ("sample_rate", "max_seconds", "silence_threshold")}}

    def __init__(self, shards: ShardsSpec = ShardsSpec(), stream: StreamSpec = StreamSpec(),
                 eval: EvalSpec = EvalSpec(), generate: GenerateSpec | str | None = None,
                 preprocess: Preprocess | None = None, audio: AudioSpec = AudioSpec()) -> None:
        super().__init__(shards, stream, eval, generate, preprocess)
        self.cfg.audio = a = coerce(audio, AudioSpec, "audio")
        self.sample_rate, self.max_seconds, self.silence_threshold = a.sample_rate, a.max_seconds, a.silence_threshold

    def decode(self, sample: dict, train: bool) -> dict:
        data = next((sample[e] for e in AUDIO_EXTS if e in sample), None)
        if data is None:
            raise KeyError("no .flac/.wav member")
        wave = decode_audio_bytes(data, self.sample_rate)
        check_clip(wave, self.sample_rate, self.max_seconds, self.silence_threshold)
        text = sample["txt"].decode("utf-8").strip()
        if not text:
            raise ValueError("empty transcript")
        validate = getattr(self.preprocess.tokenizer, "validate", None)
        if validate is not None:  # per sample, so a bad transcript skips one clip, not the whole batch
            validate(text)
        return {"audio": wave, "text": text, "key": sample["__key__"], "meta": read_json(sample)}

    def collate(self, samples: list[dict]) -> dict:
        lengths = torch.tensor([len(s["audio"]) for s in samples], dtype=torch.long)
        audio = torch.zeros(len(samples), int(lengths.max()))
        for i, s in enumerate(samples):
            audio[i, : len(s["audio"])] = s["audio"]
        texts = [s["text"] for s in samples]
        batch = {"audio": audio, "audio_lengths": lengths, "text": texts,
                 "key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples]}
        if self.preprocess.tokenizer is not None:
            batch["tokens"] = self.preprocess.tokenizer(texts)
        return batch
