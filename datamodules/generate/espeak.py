"""espeak-ng synthesis with known word onsets (the engine behind the ``spoken`` dataset).

Audio comes from ``libespeak-ng.so.1`` through ctypes in synchronous mode: the synthesis callback
receives 16-bit PCM chunks (22050 Hz) together with the synthesiser's events, and every
``espeakEVENT_WORD`` event carries the sample index at which the word starts and the character
position of the word in the input text. Those give exact word onsets (``onset_source="events"``).
If the library cannot be loaded but the ``espeak-ng`` CLI exists, audio comes from the CLI and onsets
are estimated from silence gaps (``onset_source="estimated"``, much less precise).

Audio is resampled 22050 -> 16000 Hz with ``scipy.signal.resample_poly`` (up 320, down 441, the
reduced ratio; its default Kaiser-windowed FIR acts as the anti-alias low-pass below 8 kHz).

Everything that needs espeak is resolved on first use, so this module imports without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import math
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

INSTALL_HINT = "espeak-ng is required for speech synthesis: install it with `apt-get install -y espeak-ng`"

# Accents shipped with espeak-ng (`espeak-ng --voices=en`, the non-mbrola ones) and voice
# variants (`espeak-ng --voices=variant`); a voice is "<accent>+<variant>". "en" is the en-gb voice
# (espeak_SetVoiceByName wants a voice name; "en-gb" only resolves as a language in the CLI).
ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5")
ALL_VOICES = tuple(f"{a}+{v}" for a in ACCENTS for v in VARIANTS)


class EspeakUnavailableError(RuntimeError):
    """Neither libespeak-ng nor the espeak-ng CLI could be used."""


class SynthError(RuntimeError):
    """espeak-ng rejected the request (unknown voice, failed synthesis, ...)."""


@dataclass
class Utterance:
    """One synthesised clip. ``wave`` is float32 mono in [-1, 1] at ``sample_rate``."""

    text: str
    voice: str
    speed: int
    pitch: int
    sample_rate: int
    wave: np.ndarray = field(repr=False)
    words: list[str] = field(default_factory=list)
    onsets: list[float] = field(default_factory=list)  # seconds from the start of ``wave``
    onset_source: Literal["events", "estimated"] = "events"

    @property
    def duration(self) -> float:
        return self.wave.shape[0] / self.sample_rate

    def metadata(self) -> dict:
        """JSON-ready description (everything but the waveform); times in seconds."""
        return {
            "text": self.text, "voice": self.voice, "speed": self.speed, "pitch": self.pitch,
            "sample_rate": self.sample_rate, "duration": round(self.duration, 4), "words": list(self.words),
            "onsets": [round(t, 4) for t in self.onsets], "onset_source": self.onset_source,
        }


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """Whitespace tokens as ``(word, start, end)`` character offsets (the unit of espeak events)."""
    spans, i = [], 0
    for tok in text.split():
        start = text.index(tok, i)
        spans.append((tok, start, start + len(tok)))
        i = start + len(tok)
    return spans


# -------------------------------------------------------------------------------- libespeak-ng
class _Event(ctypes.Structure):
    """``espeak_EVENT`` from speak_lib.h."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position of the word in the input
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # sample index at the native rate: finer than audio_position
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # union {int number; const char *name; char string[8]}
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_AUDIO_OUTPUT_SYNCHRONOUS, _INIT_DONT_EXIT = 2, 0x8000
_EV_LIST_TERMINATED, _EV_WORD = 0, 1
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_POS_CHARACTER, _CHARS_UTF8 = 1, 1


class _Espeak:
    """Process-wide libespeak-ng handle. The library keeps global state: calls are serialised."""

    _instance: "_Espeak | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError as e:
            raise EspeakUnavailableError(f"cannot load {name} ({e}); {INSTALL_HINT}") from e
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INIT_DONT_EXIT)
        if self.sample_rate <= 0:
            raise EspeakUnavailableError(f"espeak_Initialize failed ({self.sample_rate}); {INSTALL_HINT}")
        self.lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int]] = []
        self._cb = _CALLBACK(self._on_audio)  # keep a reference: ctypes does not
        self.lib.espeak_SetSynthCallback(self._cb)

    @classmethod
    def get(cls) -> "_Espeak":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_audio(self, wav, n, events) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        k = 0
        while events[k].type != _EV_LIST_TERMINATED:
            ev = events[k]
            if ev.type == _EV_WORD:
                self._events.append((ev.text_position, ev.sample, ev.audio_position))
            k += 1
        return 0  # 0 = continue synthesis

    def synth(self, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """int16 PCM at ``self.sample_rate`` and word events ``(text_position, sample, ms)``."""
        with self._lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SynthError(f"espeak-ng has no voice {voice!r}; see `espeak-ng --voices=en`")
            self.lib.espeak_SetParameter(_RATE, int(speed), 0)
            self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            self._chunks, self._events = [], []
            data = text.encode("utf-8") + b"\0"
            err = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if err != 0:
                raise SynthError(f"espeak_Synth failed with error {err} for {text!r}")
            self.lib.espeak_Synchronize()
            pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            return pcm, list(self._events)


def _cli_synth(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    import soundfile as sf

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakUnavailableError(INSTALL_HINT)
    proc = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise SynthError(f"espeak-ng CLI failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return wave, sr


def estimate_onsets(
    wave: np.ndarray, sample_rate: int, words: list[str], min_gap: float = 0.02, rel_threshold: float = 0.02
) -> list[float]:
    """Fallback word onsets from silence gaps (10 ms RMS frames, silence below ``rel_threshold``
    of the peak RMS, gaps of at least ``min_gap`` seconds).

    The ``len(words) - 1`` longest gaps inside the speech become word boundaries. Words joined
    without a pause (common) get no gap; missing boundaries then halve the longest remaining span.
    Against event onsets: median error ~50 ms, 90th percentile ~220 ms. Only a fallback.
    """
    hop = max(1, sample_rate // 100)
    n = len(wave) // hop
    if n == 0 or not words:
        return [0.0] * len(words)
    rms = np.sqrt(np.mean(wave[: n * hop].reshape(n, hop) ** 2, axis=1))
    voiced = rms > rel_threshold * rms.max()
    idx = np.flatnonzero(voiced)
    if idx.size == 0:  # digital silence: nothing to segment
        return [0.0] * len(words)
    first, last = int(idx[0]), int(idx[-1]) + 1
    # Silent runs inside the speech: +1/-1 edges of the voiced mask, padded with voiced ends.
    edges = np.diff(np.r_[1, voiced[first:last].astype(np.int8), 1])
    runs = zip(np.flatnonzero(edges == -1), np.flatnonzero(edges == 1))
    gaps = [(e - s, first + e) for s, e in runs if (e - s) * hop / sample_rate >= min_gap]  # (frames, resume)
    bounds = sorted(s for _, s in sorted(gaps, reverse=True)[: len(words) - 1])
    starts = [first] + bounds
    while len(starts) < len(words):  # too few gaps: halve the longest span
        ends = starts[1:] + [last]
        s = int(np.argmax(np.subtract(ends, starts)))
        starts.insert(s + 1, starts[s] + max(1, (ends[s] - starts[s]) // 2))
    return [round(s * hop / sample_rate, 4) for s in starts[: len(words)]]


def resample_to(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling (float64 internally), returned as float32 clipped to [-1, 1]."""
    if orig_sr == target_sr:
        return wave.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(orig_sr, target_sr)
    out = resample_poly(wave.astype(np.float64), target_sr // g, orig_sr // g)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def synthesize(
    text: str,
    voice: str = "en-us",
    speed: int = 160,
    pitch: int = 50,
    sample_rate: int = 16000,
    backend: Literal["auto", "library", "cli"] = "auto",
) -> Utterance:
    """Speak ``text`` and return the waveform with per-word onsets.

    Args:
        text: words separated by spaces (no digits as numerals: "472" is read "four hundred ...",
            so write "four seven two"); one onset is returned per whitespace token.
        voice: espeak-ng voice, e.g. ``"en-gb-x-rp"`` or ``"en-us+f2"`` (accent + variant).
        speed: words per minute (espeak accepts 80-450).
        pitch: base pitch 0-99 (50 is the voice's default).
        sample_rate: output rate in Hz.
        backend: ``"library"`` (exact onsets from events), ``"cli"`` (estimated onsets) or
            ``"auto"`` (library, else CLI).

    Raises:
        EspeakUnavailableError: espeak-ng is not installed (message says how to install it).
        SynthError: bad voice, failed synthesis, or events that cannot be matched to the words.
    """
    spans = word_spans(text)
    if not spans:
        raise ValueError("text to synthesise is empty")
    if not 80 <= speed <= 450:
        raise ValueError(f"speed must be in [80, 450] words per minute, got {speed}")
    if not 0 <= pitch <= 99:
        raise ValueError(f"pitch must be in [0, 99], got {pitch}")
    if backend not in ("auto", "library", "cli"):
        raise ValueError(f"backend must be 'auto', 'library' or 'cli', got {backend!r}")
    words = [w for w, _, _ in spans]
    engine = None
    if backend != "cli":
        try:
            engine = _Espeak.get()
        except EspeakUnavailableError:
            if backend == "library":
                raise
    if engine is None:
        wave, sr = _cli_synth(text, voice, speed, pitch)
        wave = resample_to(wave, sr, sample_rate)
        return Utterance(text, voice, speed, pitch, sample_rate, wave, words,
                         estimate_onsets(wave, sample_rate, words), "estimated")
    pcm, events = engine.synth(text, voice, speed, pitch)
    wave = resample_to(pcm.astype(np.float32) / 32768.0, engine.sample_rate, sample_rate)
    # Match each word to the event whose (1-based) text_position falls inside its span.
    onsets = []
    for w, start, end in spans:
        hits = [sample for pos, sample, _ in events if start <= pos - 1 < end]
        if not hits:
            raise SynthError(f"no espeak word event for {w!r} in {text!r} (events at {[e[0] for e in events]})")
        onsets.append(min(hits) / engine.sample_rate)
    # The first WORD event is at sample 0, i.e. it includes the leading pause (10-100 ms): start the
    # first word where the signal first exceeds 1% of its peak (and before the second word).
    active = np.flatnonzero(np.abs(wave) > 0.01 * np.abs(wave).max()) if wave.size else []
    if len(active):
        first = float(active[0]) / sample_rate
        onsets[0] = max(onsets[0], min(first, onsets[1] - 0.01 if len(onsets) > 1 else first))
    return Utterance(text, voice, speed, pitch, sample_rate, wave, words, onsets, "events")
