"""Speech and text encoders of the speech-text aligner (plain torch, no Lightning).

* ``SpeechFrontend``: waveform -> per-utterance normalised log-mel (+ SpecAugment in training).
* ``SpeechEncoder``: 1-D convolutional subsampling (two stride-2 convs: 10 ms -> 40 ms frames),
  then Conformer or pre-norm Transformer blocks.
* ``TextEncoder``: character embeddings then Transformer blocks.
* ``SpeechTextModel``: both towers, optional *shared* upper blocks (the same weights run on speech
  frames and text tokens, with a learned modality embedding: a joint encoder), per-token projection
  heads into the joint space and a CTC head on the speech frames.

The projection heads are linear and applied per token, so the pooled embedding (masked mean of the
projected tokens) and the frame/token sequences fed to the alignment-consistency loss live in the
same space: the consistency loss shapes exactly the space the contrastive loss uses.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import LogMelSpectrogram, SpecAugment, lengths_to_mask, normalize_per_utterance

BlockKind = Literal["conformer", "transformer"]


def sinusoidal_positions(length: int, dim: int, device=None) -> Tensor:
    """``(length, dim)`` fixed sin/cos positions (Vaswani et al.); no maximum length to configure."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """``(B, L, D)`` -> ``(B, D)`` mean over the first ``lengths[b]`` positions."""
    mask = lengths_to_mask(lengths, x.shape[1]).to(x.dtype)[..., None]
    return (x * mask).sum(1) / lengths.clamp(min=1).to(x.dtype)[:, None]


class SpeechFrontend(nn.Module):
    """Waveforms ``(B, T)`` + sample lengths -> features ``(B, n_mels, N)`` + frame lengths."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, spec_augment: SpecAugment | None = None) -> None:
        super().__init__()
        self.logmel = LogMelSpectrogram(sample_rate=sample_rate, n_mels=n_mels)
        self.spec_augment = spec_augment

    @property
    def seconds_per_frame(self) -> float:
        return self.logmel.hop_length / self.logmel.sample_rate

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        frames = self.logmel.num_frames(lengths).to(audio.device)
        feats = normalize_per_utterance(self.logmel(audio), frames)
        if self.spec_augment is not None:
            feats = self.spec_augment(feats, frames)  # identity in eval mode
        return feats, frames


class ConformerBlock(nn.Module):
    """Macaron FFN/2, self-attention, convolution module, FFN/2, final LayerNorm (Gulati et al. 2020).

    LayerNorm replaces the paper's BatchNorm in the convolution module: batch statistics would mix
    padding frames of other utterances into every clip.
    """

    def __init__(self, d: int, heads: int, ff_mult: int = 4, kernel: int = 15, dropout: float = 0.1) -> None:
        super().__init__()
        self.ff1, self.ff2 = (nn.Sequential(nn.LayerNorm(d), nn.Linear(d, ff_mult * d), nn.SiLU(), nn.Dropout(dropout),
                                            nn.Linear(ff_mult * d, d), nn.Dropout(dropout)) for _ in range(2))
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.conv_norm = nn.LayerNorm(d)
        self.pointwise_in = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.depth_norm = nn.LayerNorm(d)
        self.pointwise_out = nn.Conv1d(d, d, 1)
        self.drop = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """``x (B, L, D)``, ``pad_mask (B, L)`` True on padding."""
        x = x + 0.5 * self.ff1(x)
        h = self.attn_norm(x)
        x = x + self.drop(self.attn(h, h, h, key_padding_mask=pad_mask, need_weights=False)[0])
        h = F.glu(self.pointwise_in(self.conv_norm(x).transpose(1, 2)), dim=1)
        # Zero the padding right before the depthwise kernel reads across it (the pointwise conv's
        # bias makes it non-zero), so a clip's output does not depend on the batch's padding.
        h = self.depthwise(h.masked_fill(pad_mask[:, None, :], 0.0)).transpose(1, 2)
        h = self.pointwise_out(F.silu(self.depth_norm(h)).transpose(1, 2)).transpose(1, 2)
        x = x + self.drop(h)
        x = x + 0.5 * self.ff2(x)
        return self.out_norm(x)


class TransformerBlock(nn.TransformerEncoderLayer):
    """Pre-norm Transformer block with the same ``forward(x, pad_mask)`` as ``ConformerBlock``."""

    def __init__(self, d: int, heads: int, ff_mult: int = 4, dropout: float = 0.1) -> None:
        super().__init__(d, heads, ff_mult * d, dropout, activation="gelu", batch_first=True, norm_first=True)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, src_key_padding_mask=pad_mask)


def make_blocks(kind: BlockKind, n: int, d: int, heads: int, dropout: float, conv_kernel: int = 15) -> nn.ModuleList:
    if kind == "conformer":
        return nn.ModuleList(ConformerBlock(d, heads, kernel=conv_kernel, dropout=dropout) for _ in range(n))
    if kind == "transformer":
        return nn.ModuleList(TransformerBlock(d, heads, dropout=dropout) for _ in range(n))
    raise ValueError(f"block kind must be 'conformer' or 'transformer', got {kind!r}")


def _run(blocks: nn.ModuleList, x: Tensor, lengths: Tensor) -> Tensor:
    pad = ~lengths_to_mask(lengths, x.shape[1])
    for block in blocks:
        x = block(x, pad)
    return x


class SpeechEncoder(nn.Module):
    """Features ``(B, n_mels, N)`` -> hidden frames ``(B, N', d)`` with ``N' ~ N / 4``."""

    def __init__(self, n_mels: int = 80, d: int = 128, layers: int = 2, heads: int = 4,
                 block: BlockKind = "conformer", dropout: float = 0.1, conv_kernel: int = 15) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.blocks = make_blocks(block, layers, d, heads, dropout, conv_kernel)
        self.drop = nn.Dropout(dropout)
        self.subsampling = 4

    @staticmethod
    def _halve(frames: Tensor) -> Tensor:
        # A conv with kernel 3, stride 2, padding 1 maps L frames to floor((L - 1) / 2) + 1.
        return (frames - 1).div(2, rounding_mode="floor") + 1

    @classmethod
    def output_lengths(cls, frames: Tensor) -> Tensor:
        return cls._halve(cls._halve(frames))

    def forward(self, feats: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        h = F.gelu(self.conv1(feats))
        # Zero the padding between the convs: GELU(bias) != 0 there, and the second conv's last valid
        # frame would otherwise depend on how much padding the batch has.
        h = h * lengths_to_mask(self._halve(frames), h.shape[-1])[:, None, :].to(h.dtype)
        lengths = self.output_lengths(frames)
        x = F.gelu(self.conv2(h)).transpose(1, 2)  # (B, N', d)
        x = self.drop(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device))
        return _run(self.blocks, x, lengths), lengths


class TextEncoder(nn.Module):
    """Character ids ``(B, U)`` (0 = padding) -> hidden tokens ``(B, U, d)``."""

    def __init__(self, vocab_size: int, d: int = 128, layers: int = 2, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d, padding_idx=0)
        self.blocks = make_blocks("transformer", layers, d, heads, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        x = self.embed(tokens) * math.sqrt(self.embed.embedding_dim)
        x = self.drop(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device))
        return _run(self.blocks, x, lengths)


class SpeechTextModel(nn.Module):
    """Two towers, optional shared upper blocks, projection and CTC heads.

    Args:
        vocab_size: characters + 1 (id 0 is padding for the text tower and blank for CTC).
        d_model: width of both towers.
        embed_dim: width of the joint space (projections).
        speech_layers, text_layers: tower depths below the shared blocks.
        shared_layers: blocks run by both modalities with the same weights (0: two separate towers).
        heads: attention heads.
        speech_block: ``conformer`` or ``transformer`` for the speech tower (shared blocks are Transformer).
        n_mels: input mel bins.
        dropout: dropout everywhere.
        conv_kernel: Conformer depthwise kernel (frames of 40 ms).
    """

    def __init__(self, vocab_size: int, d_model: int = 128, embed_dim: int = 128, speech_layers: int = 2,
                 text_layers: int = 2, shared_layers: int = 0, heads: int = 4, speech_block: BlockKind = "conformer",
                 n_mels: int = 80, dropout: float = 0.1, conv_kernel: int = 15) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        for name, v in (("speech_layers", speech_layers), ("text_layers", text_layers), ("shared_layers", shared_layers)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.speech = SpeechEncoder(n_mels, d_model, speech_layers, heads, speech_block, dropout, conv_kernel)
        self.text = TextEncoder(vocab_size, d_model, text_layers, heads, dropout)
        self.shared = make_blocks("transformer", shared_layers, d_model, heads, dropout)
        # Tells the shared blocks which modality they are reading (index 0 speech, 1 text).
        self.modality_embedding = nn.Parameter(torch.zeros(2, d_model)) if shared_layers else None
        self.speech_proj = nn.Linear(d_model, embed_dim)
        self.text_proj = nn.Linear(d_model, embed_dim)
        self.ctc_head = nn.Linear(d_model, vocab_size)

    def _shared(self, x: Tensor, lengths: Tensor, modality: int) -> Tensor:
        if not len(self.shared):
            return x
        return _run(self.shared, x + self.modality_embedding[modality], lengths)

    def encode_speech(self, feats: Tensor, frames: Tensor) -> dict[str, Tensor]:
        h, lengths = self.speech(feats, frames)
        h = self._shared(h, lengths, 0)
        seq = self.speech_proj(h)
        return {"hidden": h, "seq": seq, "lengths": lengths, "emb": F.normalize(masked_mean(seq, lengths), dim=-1),
                "ctc_logits": self.ctc_head(h)}

    def encode_text(self, tokens: Tensor) -> dict[str, Tensor]:
        lengths = (tokens != 0).sum(1)
        if int(lengths.min()) < 1:
            raise ValueError("a transcript in the batch tokenised to 0 characters; empty transcripts cannot be aligned")
        h = self._shared(self.text(tokens, lengths), lengths, 1)
        seq = self.text_proj(h)
        return {"hidden": h, "seq": seq, "lengths": lengths, "emb": F.normalize(masked_mean(seq, lengths), dim=-1)}
