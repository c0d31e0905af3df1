import math

import numpy as np
import pytest
import torch

from datamodules.audio import BadClipError, check_clip
from mmalign.speech.features import (
    LogMelSpectrogram,
    SpecAugment,
    _hz_to_mel,
    _mel_to_hz,
    frames_from_samples,
    lengths_to_mask,
    normalize_per_utterance,
    pad_waveforms,
)

SR = 16000


def _tone(freq, seconds=0.5, amp=0.5):
    t = torch.arange(int(SR * seconds), dtype=torch.float32) / SR
    return amp * torch.sin(2 * math.pi * freq * t)


def test_deterministic_and_shapes():
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(n, generator=g) * 0.1 for n in (16000, 8000, 3210)]
    batch, lengths = pad_waveforms(waves)
    assert batch.shape == (3, 16000) and lengths.tolist() == [16000, 8000, 3210]
    assert torch.equal(batch[2, 3210:], torch.zeros(16000 - 3210))
    mel = LogMelSpectrogram()
    a, b = mel(batch), mel(batch)
    assert torch.equal(a, b)
    n_frames = frames_from_samples(lengths)
    assert a.shape == (3, 80, int(n_frames.max())) == (3, 80, 101)
    assert n_frames.tolist() == [101, 51, 21] == mel.num_frames(lengths).tolist()
    # Each clip alone gives exactly its valid frame count, and the same valid frames as in the batch
    # except the last n_fft/2/hop ~ 2 frames whose window reaches into the padding.
    for w, n in zip(waves, n_frames.tolist()):
        alone = mel(w)
        assert alone.shape == (1, 80, n)
    assert torch.allclose(mel(waves[1])[0, :, :48], a[1, :, :48], atol=1e-4)
    # 1-D input, odd n_fft and non-centred framing agree with torch.stft's own frame count.
    for n_fft, center in ((401, True), (400, False), (512, True)):
        spec = torch.stft(torch.randn(3210), n_fft, 160, window=torch.hann_window(n_fft), center=center,
                          return_complex=True)
        assert frames_from_samples(3210, 160, n_fft, center).item() == spec.shape[-1]


def test_pure_tone_lands_in_right_mel_bin():
    for scale in ("slaney", "htk"):
        mel = LogMelSpectrogram(mel_scale=scale)
        # Centres of the mel filters: the n_mels + 2 grid points, without the two edges.
        lo, hi = (float(_hz_to_mel(torch.tensor(f), scale)) for f in (0.0, 8000.0))
        m = torch.linspace(lo, hi, 82)
        centres = _mel_to_hz(m, scale)[1:-1]
        for freq in (440.0, 1000.0, 3000.0):
            out = mel(_tone(freq))[0, :, 5:-5].mean(-1)
            peak = int(out.argmax())
            assert abs(peak - int((centres - freq).abs().argmin())) <= 1, (scale, freq, peak)
            assert out[peak] - out.median() > 8.0  # >8 nats (~35 dB) above the typical bin


def test_mel_scale_roundtrip_and_errors():
    f = torch.tensor([0.0, 500.0, 1000.0, 4000.0, 8000.0], dtype=torch.float64)
    for scale in ("slaney", "htk"):
        assert torch.allclose(_mel_to_hz(_hz_to_mel(f, scale), scale), f, atol=1e-6)
    assert _hz_to_mel(torch.tensor(1000.0), "slaney").item() == pytest.approx(15.0)
    with pytest.raises(ValueError, match="win_length"):
        LogMelSpectrogram(win_length=512)
    with pytest.raises(ValueError, match="f_max"):
        LogMelSpectrogram(f_max=9000.0)
    with pytest.raises(ValueError, match="too short"):
        LogMelSpectrogram()(torch.randn(100))
    assert LogMelSpectrogram(pad_mode="constant")(torch.randn(100)).shape == (1, 80, 1)
    with pytest.raises(BadClipError):
        LogMelSpectrogram()(torch.zeros(2, 0))


def test_specaugment_eval_identity_and_valid_region_only():
    feats = torch.randn(3, 80, 120)
    lengths = torch.tensor([120, 60, 30])
    aug = SpecAugment(freq_masks=2, freq_width=20, time_masks=3, time_width=40, time_width_ratio=0.2,
                      mask_value=-99.0, seed=0)
    aug.eval()
    assert aug(feats, lengths) is feats
    aug.train()
    masked_any = False
    for _ in range(20):
        out = aug(feats, lengths)
        assert out.shape == feats.shape
        hit = out == -99.0
        masked_any |= bool(hit.any())
        for b, n in enumerate(lengths.tolist()):
            assert torch.equal(out[b, :, n:], feats[b, :, n:])  # padding untouched
            # A time mask is at most floor(0.2 * L) frames wide; count fully-masked columns.
            full_cols = hit[b, :, :n].all(0)
            assert int(full_cols.sum()) <= 3 * min(40, int(0.2 * n))
    assert masked_any
    # Reproducible: same seed -> same masks; explicit generator overrides the internal one.
    a1 = SpecAugment(seed=7).train()(feats, lengths)
    a2 = SpecAugment(seed=7).train()(feats, lengths)
    assert torch.equal(a1, a2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = SpecAugment(seed=1)(feats, lengths, generator=g1), SpecAugment(seed=2)(feats, lengths, generator=g2)
    assert torch.equal(a, b)
    assert not torch.equal(SpecAugment(seed=1)(feats, lengths), SpecAugment(seed=2)(feats, lengths))
    with pytest.raises(ValueError, match="time_width_ratio"):
        SpecAugment(time_width_ratio=1.5)


def test_per_utterance_norm_uses_only_valid_frames():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4, 10, generator=g) * 3 + 5
    lengths = torch.tensor([10, 6])
    garbage = feats.clone()
    garbage[1, :, 6:] = 1e4  # padding content must not change anything
    out = normalize_per_utterance(garbage, lengths)
    valid = out[1, :, :6]
    assert torch.allclose(valid.mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(valid.var(-1, unbiased=False), torch.ones(4), atol=1e-3)
    assert torch.equal(out[1, :, 6:], torch.zeros(4, 4))
    assert torch.allclose(out[1, :, :6], normalize_per_utterance(feats[1:, :, :6])[0], atol=1e-6)
    with pytest.raises(ValueError, match="frame_lengths"):
        normalize_per_utterance(feats, torch.tensor([11, 3]))


def test_lengths_to_mask():
    m = lengths_to_mask(torch.tensor([3, 1]), 4)
    assert m.tolist() == [[True, True, True, False], [True, False, False, False]]


@pytest.mark.parametrize(
    "wave,reason",
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.zeros(1600, dtype=np.float32), "silent"),
        (np.full(1600, 1e-6, dtype=np.float32), "silent"),
        (np.array([0.1, np.nan, 0.2], dtype=np.float32), "non_finite"),
        (np.full(16000 * 3, 0.1, dtype=np.float32), "too_long"),
        (np.zeros((2, 100), dtype=np.float32), "bad_shape"),
    ],
)
def test_check_clip_errors(wave, reason):
    with pytest.raises(BadClipError) as e:
        check_clip(wave, SR, max_seconds=2.0)
    assert e.value.reason == reason and reason in str(e.value)


def test_check_clip_ok_and_pad_errors():
    assert check_clip(_tone(300.0, 0.5), SR, max_seconds=2.0) == pytest.approx(0.5)
    with pytest.raises(BadClipError) as e:
        pad_waveforms([torch.ones(5), torch.zeros(0)])
    assert e.value.reason == "empty"
    with pytest.raises(ValueError, match="empty list"):
        pad_waveforms([])
