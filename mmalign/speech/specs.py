"""The options of ``SpeechTextAligner``, grouped into frozen specs.

``SpeechTextAligner(towers, features, losses, optim, eval)``; in YAML each spec is a mapping under
``model.init_args`` (``--model.init_args.losses.ctc_weight=1.0``). Each spec checks its own values on
construction (the error names the field, the value and what is allowed). ``SPEECH_MOVED`` sends every
option of the older flat signature to its new place (CLI hint, old checkpoints).

Plain stdlib + ``mmalign.specs``: importable without Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mmalign.specs import OPTIM_MOVED, OptimSpec, need, one_of, positive, unit_interval

from .tokenizer import DEFAULT_ALPHABET

SPEECH_OPTIM = OptimSpec(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98))

#: SpecAugment defaults of this module (``features.SpecAugment``'s own are for 100-frame/s LibriSpeech)
DEFAULT_SPEC_AUGMENT = {"freq_masks": 2, "freq_width": 15, "time_masks": 2, "time_width": 20, "time_width_ratio": 0.1}
SPEC_AUGMENT_KEYS = ("freq_masks", "freq_width", "time_masks", "time_width", "time_width_ratio", "mask_value", "seed")


@dataclass(frozen=True)
class TowerSpec:
    """The speech and text encoders.

    Args:
        d_model: Width of both towers.
        embed_dim: Width of the joint embedding space.
        speech_layers: Speech tower blocks after the convolutional subsampling.
        text_layers: Text tower Transformer blocks.
        shared_layers: Upper blocks shared by both modalities (a joint encoder); 0 keeps two towers.
        heads: Attention heads (``d_model`` must be a multiple).
        speech_block: ``conformer`` or ``transformer``.
        conv_kernel: Conformer depthwise convolution kernel (in 40 ms frames).
        dropout: Dropout in every block.
    """

    d_model: int = 128
    embed_dim: int = 128
    speech_layers: int = 2
    text_layers: int = 2
    shared_layers: int = 0
    heads: int = 4
    speech_block: Literal["conformer", "transformer"] = "conformer"
    conv_kernel: int = 15
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("d_model", "embed_dim", "heads", "conv_kernel"):
            positive(f"towers.{name}", getattr(self, name))
        for name in ("speech_layers", "text_layers", "shared_layers"):
            positive(f"towers.{name}", getattr(self, name), zero=True)
        need(self.d_model % self.heads == 0,
             f"towers.d_model ({self.d_model}) must be a multiple of towers.heads ({self.heads}).")
        one_of("towers.speech_block", self.speech_block, ("conformer", "transformer"))
        unit_interval("towers.dropout", self.dropout)


@dataclass(frozen=True)
class SpeechFeatureSpec:
    """What the towers read: log-mel frames of the audio, character ids of the transcript.

    Args:
        sample_rate: Audio rate the datamodule delivers.
        n_mels: Log-mel bands (25 ms windows, 10 ms hop).
        spec_augment: Apply SpecAugment to the training features.
        spec_augment_kwargs: Overrides of the SpecAugment defaults (``mmalign.speech.features.SpecAugment``
            arguments; defaults here: 2 frequency masks <= 15 bins, 2 time masks <= 20 frames and <= 10%).
        alphabet: Transcript characters (ids 1..n; 0 is padding and the CTC blank); must hold ' '.
        max_text_length: Longest transcript in characters; longer ones are rejected (skipped by the stream).
    """

    sample_rate: int = 16000
    n_mels: int = 80
    spec_augment: bool = True
    spec_augment_kwargs: dict[str, Any] | None = None
    alphabet: str = DEFAULT_ALPHABET
    max_text_length: int = 200

    def __post_init__(self) -> None:
        positive("features.sample_rate", self.sample_rate)
        positive("features.n_mels", self.n_mels)
        positive("features.max_text_length", self.max_text_length)
        unknown = sorted(set(self.spec_augment_kwargs or {}) - set(SPEC_AUGMENT_KEYS))
        need(not unknown, f"features.spec_augment_kwargs: unknown key(s) {unknown}; allowed: {list(SPEC_AUGMENT_KEYS)}.")
        need(isinstance(self.alphabet, str) and len(set(self.alphabet)) == len(self.alphabet) and " " in self.alphabet,
             f"features.alphabet must hold unique characters including ' ', got {self.alphabet!r}.")


@dataclass(frozen=True)
class SpeechLossSpec:
    """Loss weights (a weight of 0 leaves that loss uncomputed) and their settings.

    Args:
        contrastive_weight: Weight of the contrastive loss.
        multi_positive: Clips sharing a transcript are all positives (else only the diagonal).
        init_logit_scale: Initial log temperature scale (default log(1/0.07)).
        max_logit_scale: The scale is clamped to at most this after each optimizer step.
        ctc_weight: Weight of the CTC loss (0: no CTC head training and no WER/onset metrics).
        consistency_weight: Weight of the alignment-consistency loss; it admits collapse on its own,
            so ``contrastive_weight`` or ``ctc_weight`` must be > 0.
        consistency_mode: ``dtw`` (hard DTW) or ``soft_dtw`` (soft-DTW divergence).
        consistency_gamma: Soft-DTW temperature in cost units (> 0 for ``soft_dtw``).
        consistency_cost: ``cosine`` or ``sqeuclidean`` frame-token cost.
    """

    contrastive_weight: float = 1.0
    multi_positive: bool = True
    init_logit_scale: float | None = None
    max_logit_scale: float = 100.0
    ctc_weight: float = 0.0
    consistency_weight: float = 0.0
    consistency_mode: Literal["dtw", "soft_dtw"] = "soft_dtw"
    consistency_gamma: float = 0.1
    consistency_cost: Literal["cosine", "sqeuclidean"] = "cosine"

    def __post_init__(self) -> None:
        for name in ("contrastive_weight", "ctc_weight", "consistency_weight"):
            positive(f"losses.{name}", getattr(self, name), zero=True)
        need(self.contrastive_weight > 0 or self.ctc_weight > 0,
             "losses.contrastive_weight and losses.ctc_weight are both 0: the consistency loss alone admits collapse "
             "(constant encoders have zero alignment cost). Give one of them a weight > 0.")
        positive("losses.max_logit_scale", self.max_logit_scale)
        one_of("losses.consistency_mode", self.consistency_mode, ("dtw", "soft_dtw"))
        one_of("losses.consistency_cost", self.consistency_cost, ("cosine", "sqeuclidean"))
        if self.consistency_mode == "soft_dtw":
            positive("losses.consistency_gamma (soft_dtw)", self.consistency_gamma)


@dataclass(frozen=True)
class SpeechEvalSpec:
    """Evaluation settings.

    Args:
        retrieval_chunk_size: Query chunk of the retrieval evaluator.
        onset_tolerance_ms: Threshold of the ``onset_within_*`` metric.
    """

    retrieval_chunk_size: int = 1024
    onset_tolerance_ms: float = 50.0

    def __post_init__(self) -> None:
        positive("eval.retrieval_chunk_size", self.retrieval_chunk_size)
        positive("eval.onset_tolerance_ms", self.onset_tolerance_ms)


_GROUPED = {
    "towers": ("d_model", "embed_dim", "speech_layers", "text_layers", "shared_layers", "heads", "speech_block",
               "conv_kernel", "dropout"),
    "features": ("sample_rate", "n_mels", "spec_augment", "spec_augment_kwargs", "alphabet", "max_text_length"),
    "losses": ("contrastive_weight", "multi_positive", "init_logit_scale", "max_logit_scale", "ctc_weight",
               "consistency_weight", "consistency_mode", "consistency_gamma", "consistency_cost"),
    "eval": ("retrieval_chunk_size", "onset_tolerance_ms"),
}
#: every option of the older flat ``SpeechTextAligner`` signature and where it lives now (same field names)
SPEECH_MOVED = {**{k: f"{g}.{k}" for g, keys in _GROUPED.items() for k in keys}, **OPTIM_MOVED}
