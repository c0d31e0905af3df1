"""Audio for the data layer: decoding clips and the checks that make a clip skippable.

Clip checks live here (not with the speech encoder) because the stream and the espeak-ng
generator both need them to skip and count bad clips before anything trains on them.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

AUDIO_EXTS = ("flac", "wav")


def decode_audio_bytes(data: bytes, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform at ``sample_rate`` (polyphase resampling when the file differs)."""
    import soundfile as sf

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, sample_rate)
        wave = resample_poly(wave, sample_rate // g, sr // g).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(wave))


class BadClipError(ValueError):
    """A clip the data pipeline should skip (and count) rather than train on.

    ``reason`` is one of ``BadClipError.REASONS`` so callers can keep per-reason counters.
    """

    REASONS = ("empty", "non_finite", "too_long", "silent", "bad_shape")

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown BadClipError reason {reason!r}; expected one of {self.REASONS}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"bad clip ({reason}): {detail}" if detail else f"bad clip ({reason})")


def check_clip(
    wave: Tensor | np.ndarray,
    sample_rate: int,
    max_seconds: float | None = None,
    silence_threshold: float = 1e-4,
) -> float:
    """Validate one mono clip and return its duration in seconds.

    Args:
        wave: 1-D waveform (torch or numpy), float in [-1, 1].
        sample_rate: samples per second, used for the duration check.
        max_seconds: reject clips longer than this; ``None`` disables the check.
        silence_threshold: reject clips whose peak ``|x|`` is below this (1e-4 is -80 dBFS; digital
            silence and near-silence give all-floor log-mels and a degenerate normalisation).

    Raises:
        BadClipError: with ``reason`` ``"bad_shape"`` (not 1-D), ``"empty"`` (0 samples),
            ``"non_finite"`` (NaN/inf), ``"too_long"`` or ``"silent"``.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    x = wave.detach().cpu().numpy() if isinstance(wave, Tensor) else np.asarray(wave)
    if x.ndim != 1:
        raise BadClipError("bad_shape", f"expected a 1-D mono waveform, got shape {tuple(x.shape)}")
    if x.size == 0:
        raise BadClipError("empty", "0 samples")
    if not np.all(np.isfinite(x)):
        raise BadClipError("non_finite", f"{int(np.sum(~np.isfinite(x)))} NaN/inf samples")
    seconds = x.size / sample_rate
    if max_seconds is not None and seconds > max_seconds:
        raise BadClipError("too_long", f"{seconds:.2f} s > max_seconds={max_seconds}")
    peak = float(np.max(np.abs(x)))
    if peak < silence_threshold:
        raise BadClipError("silent", f"peak {peak:.2e} < silence_threshold={silence_threshold:.0e}")
    return seconds
