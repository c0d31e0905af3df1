"""Log-mel features, per-utterance normalisation, SpecAugment and length bookkeeping.

Conventions used throughout:

* waveforms are float, mono, in [-1, 1], shape ``(B, T)`` samples (or ``(T,)`` for one clip);
* features are ``(B, n_mels, N)`` with ``N`` STFT frames (channel-first, like a 1-D conv input);
* ``lengths`` are valid sample counts, ``frame_lengths`` valid frame counts; everything past them is
  padding and must not influence statistics or receive augmentation.

The mel filterbank is built here (HTK or Slaney mel scale, optional Slaney area normalisation, the
same equations as librosa/torchaudio) so there is no torchaudio dependency.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from datamodules.audio import BadClipError


def pad_waveforms(waves: Sequence[Tensor], pad_value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D waveforms into ``(B, T_max)`` and return it with the ``(B,)`` int64 lengths."""
    if len(waves) == 0:
        raise ValueError("pad_waveforms got an empty list; a batch needs at least one clip")
    for i, w in enumerate(waves):
        if not isinstance(w, Tensor) or w.dim() != 1:
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"waves[{i}] must be a 1-D tensor, got {shape}")
        if w.numel() == 0:
            raise BadClipError("empty", f"waves[{i}] has 0 samples")
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    out = waves[0].new_full((len(waves), int(lengths.max())), pad_value)
    for i, w in enumerate(waves):
        out[i, : w.numel()] = w
    return out, lengths


def frames_from_samples(
    lengths: Tensor | int, hop_length: int = 160, n_fft: int = 400, center: bool = True
) -> Tensor:
    """Number of STFT frames that cover ``lengths`` samples, matching ``torch.stft``.

    With ``center=True`` the signal is padded by ``n_fft // 2`` on both sides, so a clip of ``L``
    samples gives ``1 + (L + 2 * (n_fft // 2) - n_fft) // hop`` frames (``1 + L // hop`` for even
    ``n_fft``). Frames of a padded batch beyond this count are padding.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if center:
        return 1 + (lengths + 2 * (n_fft // 2) - n_fft).div(hop_length, rounding_mode="floor")
    return (1 + (lengths - n_fft).div(hop_length, rounding_mode="floor")).clamp(min=0)


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """``(B,)`` lengths -> ``(B, max_len)`` bool mask, True on valid positions."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    max_len = int(lengths.max()) if max_len is None and lengths.numel() else (max_len or 0)
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


# ---------------------------------------------------------------------------------------- mel scale
def _hz_to_mel(f: Tensor, scale: str) -> Tensor:
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    # Slaney (Auditory Toolbox): linear below 1 kHz at 200/3 Hz per mel, log above with
    # 27 steps per factor 6.4 in frequency.
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(
        f < min_log_hz, f / f_sp, min_log_mel + torch.log(f.clamp(min=1e-10) / min_log_hz) / logstep
    )


def _mel_to_hz(m: Tensor, scale: str) -> Tensor:
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(m < min_log_mel, m * f_sp, min_log_hz * torch.exp(logstep * (m - min_log_mel)))


def mel_filterbank(
    n_freqs: int,
    sample_rate: int,
    n_mels: int,
    f_min: float,
    f_max: float,
    mel_scale: Literal["htk", "slaney"] = "slaney",
    norm: Literal["slaney"] | None = "slaney",
) -> Tensor:
    """Triangular mel filters as a ``(n_freqs, n_mels)`` matrix (power spectrum @ fb = mel energies).

    Filter ``k`` rises linearly from centre ``k-1`` to ``k`` and falls to ``k+1`` on a grid of
    ``n_mels + 2`` points equally spaced in mel. ``norm="slaney"`` scales each triangle by
    ``2 / (f_{k+1} - f_{k-1})`` so every filter has unit area (wide high filters are not louder).
    """
    all_freqs = torch.linspace(0.0, sample_rate / 2.0, n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(
        float(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64), mel_scale)),
        float(_hz_to_mel(torch.tensor(f_max, dtype=torch.float64), mel_scale)),
        n_mels + 2,
        dtype=torch.float64,
    )
    f_pts = _mel_to_hz(m_pts, mel_scale)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1,)
    slopes = f_pts[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.minimum(down, up), min=0.0)
    if norm == "slaney":
        fb = fb * (2.0 / (f_pts[2 : n_mels + 2] - f_pts[:n_mels]))[None, :]
    empty = int((fb.max(dim=0).values == 0).sum())
    if empty:
        warnings.warn(
            f"{empty} of {n_mels} mel filters contain no FFT bin (n_mels too high for n_fft); "
            "they will output only the log floor",
            stacklevel=3,
        )
    return fb.float()


class LogMelSpectrogram(nn.Module):
    """Waveform ``(B, T)`` or ``(T,)`` -> log-mel ``(B, n_mels, N)``, ``N = frames_from_samples(T)``.

    Args:
        sample_rate: input rate in Hz (16 kHz: 400-sample windows are 25 ms, hop 160 is 10 ms).
        n_fft: FFT size; gives ``n_fft // 2 + 1`` linear-frequency bins.
        hop_length: samples between frames.
        win_length: Hann window length (<= n_fft; zero-padded to n_fft by ``torch.stft``).
        n_mels: mel bands.
        f_min, f_max: band edges in Hz; ``f_max=None`` means Nyquist.
        mel_scale: ``"slaney"`` (librosa default) or ``"htk"``.
        norm: ``"slaney"`` unit-area filters, or ``None`` for unit-peak triangles.
        log_floor: energies are clamped to this before ``log`` so silence/padding is finite.
        pad_mode: padding of ``center=True`` framing, ``"reflect"`` (needs ``T > n_fft // 2``) or
            ``"constant"``.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        win_length: int = 400,
        n_mels: int = 80,
        f_min: float = 0.0,
        f_max: float | None = None,
        mel_scale: Literal["htk", "slaney"] = "slaney",
        norm: Literal["slaney"] | None = "slaney",
        log_floor: float = 1e-6,
        pad_mode: Literal["reflect", "constant"] = "reflect",
    ) -> None:
        super().__init__()
        for name, v in (("sample_rate", sample_rate), ("n_fft", n_fft), ("hop_length", hop_length),
                        ("win_length", win_length), ("n_mels", n_mels)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if win_length > n_fft:
            raise ValueError(f"win_length ({win_length}) must be <= n_fft ({n_fft})")
        f_max = sample_rate / 2.0 if f_max is None else f_max
        if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
            raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2} Hz, got f_min={f_min}, f_max={f_max}")
        if mel_scale not in ("htk", "slaney"):
            raise ValueError(f"mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")
        if norm not in ("slaney", None):
            raise ValueError(f"norm must be 'slaney' or None, got {norm!r}")
        if log_floor <= 0:
            raise ValueError(f"log_floor must be > 0, got {log_floor}")
        if pad_mode not in ("reflect", "constant"):
            raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}")
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.win_length, self.n_mels, self.log_floor, self.pad_mode = win_length, n_mels, log_floor, pad_mode
        self.f_min, self.f_max = f_min, f_max
        # Non-persistent: both are pure functions of the arguments, so checkpoints stay portable.
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)
        self.register_buffer(
            "mel_fb",
            mel_filterbank(n_fft // 2 + 1, sample_rate, n_mels, f_min, f_max, mel_scale, norm),
            persistent=False,
        )

    def num_frames(self, lengths: Tensor | int) -> Tensor:
        """Valid frame counts for valid sample counts (``center=True``)."""
        return frames_from_samples(lengths, self.hop_length, self.n_fft, center=True)

    def forward(self, wave: Tensor) -> Tensor:
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise ValueError(f"expected waveform (B, T) or (T,), got shape {tuple(wave.shape)}")
        if wave.shape[-1] == 0:
            raise BadClipError("empty", "waveform has 0 samples")
        if self.pad_mode == "reflect" and wave.shape[-1] <= self.n_fft // 2:
            raise ValueError(
                f"waveform of {wave.shape[-1]} samples is too short for reflect padding "
                f"(needs > {self.n_fft // 2}); pad it or use pad_mode='constant'"
            )
        x = wave.float()  # fp16 power spectra overflow (full-scale sine -> |X|^2 ~ 1e4 * n_fft)
        spec = torch.stft(
            x, self.n_fft, self.hop_length, self.win_length, self.window, center=True,
            pad_mode=self.pad_mode, return_complex=True,
        )  # (B, n_fft // 2 + 1, N)
        power = spec.real.square() + spec.imag.square()
        mel = torch.einsum("bfn,fm->bmn", power, self.mel_fb)  # (B, n_mels, N)
        return torch.log(mel.clamp(min=self.log_floor))


def normalize_per_utterance(
    feats: Tensor, frame_lengths: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Zero-mean, unit-variance per utterance and per mel bin, statistics over valid frames only.

    Args:
        feats: ``(B, F, N)`` features.
        frame_lengths: ``(B,)`` valid frames; ``None`` means all ``N`` frames are valid.
        eps: added to the variance (population variance, ``1/L``) before the square root.

    Padding frames are set to 0 in the output (the mean after normalisation), so they neither
    carry the padding's log floor into the model nor depend on how much padding there is.
    """
    if feats.dim() != 3:
        raise ValueError(f"feats must be (B, F, N), got shape {tuple(feats.shape)}")
    B, _, N = feats.shape
    if frame_lengths is None:
        frame_lengths = torch.full((B,), N, dtype=torch.long, device=feats.device)
    if frame_lengths.shape != (B,) or int(frame_lengths.min()) < 1 or int(frame_lengths.max()) > N:
        raise ValueError(f"frame_lengths must be (B,)={B} values in [1, {N}], got {frame_lengths.tolist()}")
    mask = lengths_to_mask(frame_lengths.to(feats.device), N)[:, None, :].to(feats.dtype)  # (B, 1, N)
    count = frame_lengths.to(feats.device, feats.dtype)[:, None, None]
    mean = (feats * mask).sum(-1, keepdim=True) / count
    var = ((feats - mean).square() * mask).sum(-1, keepdim=True) / count
    return (feats - mean) / torch.sqrt(var + eps) * mask


class SpecAugment(nn.Module):
    """Frequency and time masking (Park et al. 2019, without time warping), training mode only.

    Per utterance, ``freq_masks`` bands of width ``~U{0..freq_width}`` and ``time_masks`` spans of
    width ``~U{0..min(time_width, floor(time_width_ratio * L))}`` (``L`` = valid frames, so short
    clips are not wiped out) are set to ``mask_value``. Masks are placed inside the valid frames and
    padding is never touched. In eval mode the input is returned unchanged.

    Args:
        freq_masks, freq_width: number and maximum width (mel bins) of frequency masks.
        time_masks, time_width: number and maximum width (frames) of time masks.
        time_width_ratio: cap of a time mask as a fraction of the utterance's valid frames.
        mask_value: fill value (0 = the mean after per-utterance normalisation).
        seed: if given, an internal CPU generator seeded with it makes the masks reproducible
            (the generator advances per call); a ``generator`` passed to ``forward`` wins over it.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 27,
        time_masks: int = 2,
        time_width: int = 40,
        time_width_ratio: float = 0.05,
        mask_value: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("freq_masks", freq_masks), ("freq_width", freq_width),
                        ("time_masks", time_masks), ("time_width", time_width)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not 0.0 <= time_width_ratio <= 1.0:
            raise ValueError(f"time_width_ratio must be in [0, 1], got {time_width_ratio}")
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.time_width_ratio, self.mask_value = time_width_ratio, mask_value
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _spans(self, n: int, max_width: Tensor, extent: Tensor, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``n`` random spans per row: width ~U{0..max_width}, start ~U{0..extent - width}.

        Drawn on CPU (so a seed gives the same masks on any device) as uniform floats scaled to the
        integer ranges; both are (B, n) int64.
        """
        B = max_width.shape[0]
        u_w, u_s = torch.rand((2, B, n), generator=gen)
        width = torch.floor(u_w * (max_width[:, None] + 1).double()).long()
        start = torch.floor(u_s * (extent[:, None] - width + 1).double()).long()
        return start, width

    def forward(
        self, feats: Tensor, frame_lengths: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``feats (B, F, N)``, ``frame_lengths (B,)`` -> masked copy (the input is not modified)."""
        if not self.training or (self.freq_masks == 0 and self.time_masks == 0):
            return feats
        if feats.dim() != 3:
            raise ValueError(f"feats must be (B, F, N), got shape {tuple(feats.shape)}")
        B, F, N = feats.shape
        lengths = torch.full((B,), N, dtype=torch.long) if frame_lengths is None else frame_lengths.cpu().long()
        gen = generator if generator is not None else self._generator
        f_idx, t_idx = torch.arange(F), torch.arange(N)
        mask = torch.zeros(B, F, N, dtype=torch.bool)
        if self.freq_masks:
            full = torch.full((B,), F)
            start, width = self._spans(self.freq_masks, full.clamp(max=self.freq_width), full, gen)
            band = (f_idx[None, None] >= start[..., None]) & (f_idx[None, None] < (start + width)[..., None])
            mask |= band.any(1)[:, :, None]  # (B, F, 1): the whole band, restricted to valid frames below
        if self.time_masks:
            cap = torch.minimum(torch.full((B,), self.time_width), torch.floor(lengths * self.time_width_ratio).long())
            start, width = self._spans(self.time_masks, cap, lengths, gen)
            span = (t_idx[None, None] >= start[..., None]) & (t_idx[None, None] < (start + width)[..., None])
            mask |= span.any(1)[:, None, :]
        mask &= lengths_to_mask(lengths, N)[:, None, :]
        return feats.masked_fill(mask.to(feats.device), self.mask_value)
