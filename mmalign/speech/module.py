"""``SpeechTextAligner``: a speech encoder aligned with a text encoder.

Losses, combined with configurable weights (any with weight 0 is not computed):

* contrastive: symmetric InfoNCE on pooled, projected, L2-normalised embeddings, exact across ranks,
  with every clip of the same transcript a positive (``MultiPositiveContrastiveLoss``);
* CTC: a character head on the speech frames (blank = id 0);
* consistency: best-monotonic-alignment distance between projected speech frames and projected text
  tokens (hard DTW or the soft-DTW divergence, ``AlignmentConsistencyLoss``). It admits collapse on
  its own, so it needs a contrastive or CTC weight beside it.

Evaluation per validation set: recall@1/5/10 speech->text and text->speech (several clips per
transcript are all correct), alignment/uniformity/modality gap, and with a CTC head WER and CER of
greedy decoding plus the word-onset error of CTC forced alignment against the synthesiser's onsets
(with a length-proportional baseline).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from datamodules.base import Preprocess
from mmalign.training.eval_scaffold import EvalScaffold

from .tokenizer import DEFAULT_ALPHABET, CharTokenizer

_DEFAULT_SPEC_AUGMENT = {"freq_masks": 2, "freq_width": 15, "time_masks": 2, "time_width": 20,
                         "time_width_ratio": 0.1}


class SpeechTextAligner(EvalScaffold, pl.LightningModule):
    """Speech-text alignment with contrastive, CTC and best-alignment consistency losses.

    Args:
        alphabet: Transcript characters (ids 1..n; 0 is padding and the CTC blank).
        max_text_length: Longest transcript in characters; longer ones are rejected (skipped by the stream).
        sample_rate: Audio rate the datamodule delivers.
        n_mels: Log-mel bands (25 ms windows, 10 ms hop).
        d_model: Width of both towers.
        embed_dim: Width of the joint embedding space.
        speech_layers: Speech tower blocks after the convolutional subsampling.
        text_layers: Text tower Transformer blocks.
        shared_layers: Upper blocks shared by both modalities (a joint encoder); 0 keeps two towers.
        heads: Attention heads.
        speech_block: ``conformer`` or ``transformer``.
        conv_kernel: Conformer depthwise convolution kernel (in 40 ms frames).
        dropout: Dropout in every block.
        spec_augment: Apply SpecAugment to the training features.
        spec_augment_kwargs: Overrides of the SpecAugment defaults (``mmalign.speech.features.SpecAugment``
            arguments; defaults here: 2 frequency masks <= 15 bins, 2 time masks <= 20 frames and <= 10%).
        contrastive_weight: Weight of the contrastive loss.
        multi_positive: Clips sharing a transcript are all positives (else only the diagonal).
        init_logit_scale: Initial log temperature scale (default log(1/0.07)).
        max_logit_scale: The scale is clamped to at most this after each optimizer step.
        ctc_weight: Weight of the CTC loss (0: no CTC head training and no WER/onset metrics).
        consistency_weight: Weight of the alignment-consistency loss.
        consistency_mode: ``dtw`` (hard DTW) or ``soft_dtw`` (soft-DTW divergence).
        consistency_gamma: Soft-DTW temperature in cost units.
        consistency_cost: ``cosine`` or ``sqeuclidean`` frame-token cost.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (``mmalign.optim.decays``: matrices only).
        betas: AdamW betas.
        warmup_steps: Linear warm-up, then cosine decay over the run.
        retrieval_chunk_size: Query chunk of the retrieval evaluator.
        onset_tolerance_ms: Threshold of the ``onset_within_*`` metric.
    """

    def __init__(
        self,
        alphabet: str = DEFAULT_ALPHABET,
        max_text_length: int = 200,
        sample_rate: int = 16000,
        n_mels: int = 80,
        d_model: int = 128,
        embed_dim: int = 128,
        speech_layers: int = 2,
        text_layers: int = 2,
        shared_layers: int = 0,
        heads: int = 4,
        speech_block: Literal["conformer", "transformer"] = "conformer",
        conv_kernel: int = 15,
        dropout: float = 0.1,
        spec_augment: bool = True,
        spec_augment_kwargs: dict[str, Any] | None = None,
        contrastive_weight: float = 1.0,
        multi_positive: bool = True,
        init_logit_scale: float | None = None,
        max_logit_scale: float = 100.0,
        ctc_weight: float = 0.0,
        consistency_weight: float = 0.0,
        consistency_mode: Literal["dtw", "soft_dtw"] = "soft_dtw",
        consistency_gamma: float = 0.1,
        consistency_cost: Literal["cosine", "sqeuclidean"] = "cosine",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 0,
        retrieval_chunk_size: int = 1024,
        onset_tolerance_ms: float = 50.0,
    ) -> None:
        super().__init__()
        for name, w in (("contrastive_weight", contrastive_weight), ("ctc_weight", ctc_weight),
                        ("consistency_weight", consistency_weight)):
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        if contrastive_weight == 0 and ctc_weight == 0:
            raise ValueError("contrastive_weight and ctc_weight are both 0: the consistency loss alone admits "
                             "collapse (constant encoders have zero alignment cost). Give one of them a weight > 0.")
        self.save_hyperparameters()
        from mmalign.speech.consistency import AlignmentConsistencyLoss
        from mmalign.losses.contrastive import init_logit_scale as make_scale
        from mmalign.speech.multipositive import MultiPositiveContrastiveLoss

        from .features import SpecAugment
        from .model import SpeechFrontend, SpeechTextModel

        self.tokenizer = CharTokenizer(alphabet, max_text_length)
        augment = SpecAugment(**(_DEFAULT_SPEC_AUGMENT | dict(spec_augment_kwargs or {}))) if spec_augment else None
        self.frontend = SpeechFrontend(sample_rate, n_mels, augment)
        self.model = SpeechTextModel(self.tokenizer.vocab_size, d_model, embed_dim, speech_layers, text_layers,
                                     shared_layers, heads, speech_block, n_mels, dropout, conv_kernel)
        self.logit_scale = make_scale("clip", init_logit_scale)
        self.contrastive = MultiPositiveContrastiveLoss(multi_positive)
        self.consistency = AlignmentConsistencyLoss(consistency_mode, consistency_gamma, consistency_cost,
                                                    normalize=True, divergence=True)

    # ---- data hand-over -----------------------------------------------------------------------
    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(tokenizer=self.tokenizer)

    @property
    def seconds_per_frame(self) -> float:
        """Time between encoder frames (STFT hop x subsampling); frame k is centred at k * this."""
        return self.frontend.seconds_per_frame * self.model.speech.subsampling

    # ---- forward / losses ---------------------------------------------------------------------
    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor, tokens: torch.Tensor):
        feats, frames = self.frontend(audio, audio_lengths)
        return self.model.encode_speech(feats, frames), self.model.encode_text(tokens)

    def _tokens(self, batch: dict) -> torch.Tensor:
        if "tokens" in batch:
            return batch["tokens"].to(self.device)
        if "text" in batch:  # not linked through the CLI (e.g. a plain script): tokenise here
            return self.tokenizer(batch["text"]).to(self.device)
        raise KeyError("batch has neither 'tokens' nor 'text': use datamodules.AudioTextDataModule")

    def losses(self, batch: dict, local_only: bool = False) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """Weighted components and their sum under ``"loss"``, plus the speech/text encoder outputs."""
        from .metrics import transcript_ids

        tokens = self._tokens(batch)
        sp, tx = self(batch["audio"], batch["audio_lengths"], tokens)
        h = self.hparams
        out: dict[str, torch.Tensor] = {}
        if h.contrastive_weight > 0:
            ids = transcript_ids(batch["text"], self.device)
            out["contrastive"] = self.contrastive(sp["emb"], tx["emb"], self.logit_scale.exp(), ids,
                                                  local_only=local_only)
        if h.ctc_weight > 0:
            log_probs = F.log_softmax(sp["ctc_logits"].float(), -1).transpose(0, 1)  # (T, B, V)
            # zero_infinity: a clip too short for its transcript gives inf; it then contributes nothing.
            out["ctc"] = F.ctc_loss(log_probs, tokens, sp["lengths"], tx["lengths"], blank=0,
                                    reduction="mean", zero_infinity=True)
        if h.consistency_weight > 0:
            out["consistency"] = self.consistency(sp["seq"], tx["seq"], sp["lengths"], tx["lengths"])
        weights = {"contrastive": h.contrastive_weight, "ctc": h.ctc_weight, "consistency": h.consistency_weight}
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        return out, sp, tx

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts, _, _ = self.losses(batch)
        bs = len(batch["text"])
        for k, v in parts.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k == "loss", batch_size=bs)
        self.log("train/logit_scale", self.logit_scale.detach().exp(), batch_size=bs)
        return parts["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        from mmalign.losses.contrastive import clamp_logit_scale_

        clamp_logit_scale_(self.logit_scale.data, self.hparams.max_logit_scale)

    # ---- evaluation (mmalign.training.eval_scaffold) -----------------------------------------
    eval_progress_keys = ("speech2text_r1",)
    _RENAME = {"i2t": "text2speech", "t2i": "speech2text"}

    def build_eval_metrics(self, split: str) -> dict:
        from torchmetrics.text import CharErrorRate, WordErrorRate

        from mmalign.evaluation import EmbeddingGeometry, RetrievalRecall

        from .metrics import OnsetError

        m = {"retrieval": RetrievalRecall(chunk_size=self.hparams.retrieval_chunk_size),
             "geometry": EmbeddingGeometry(max_samples=4096)}
        if self.hparams.ctc_weight > 0:
            m.update(wer=WordErrorRate(), cer=CharErrorRate(), onset=OnsetError(self.hparams.onset_tolerance_ms))
        return m

    def eval_key(self, kind: str, key: str) -> str:
        head, _, tail = key.partition("_")
        key = f"{self._RENAME[head]}_{tail}" if head in self._RENAME else key
        return key.replace("uniformity_image", "uniformity_speech")  # geometry gets (speech, text)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_step(batch, self.eval_split_names()[dataloader_idx])

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_step(batch, "test")

    @torch.no_grad()
    def eval_step(self, batch: dict, name: str) -> None:
        from .metrics import greedy_ctc_decode, transcript_ids

        metrics = self.eval_metrics(name)
        parts, sp, tx = self.losses(batch, local_only=True)
        bs = len(batch["text"])
        for k, v in parts.items():
            self.log(f"{name}/{k}", v, batch_size=bs, sync_dist=True, add_dataloader_idx=False)
        ids = transcript_ids(batch["text"], self.device)
        # Transcripts are the "images" of RetrievalRecall (a gallery deduplicated by id) and clips
        # its "captions": t2i is speech->text (one correct transcript), i2t is text->speech (a hit
        # if ANY clip of the transcript is ranked within k).
        metrics["retrieval"].update(tx["emb"], sp["emb"], ids, ids)
        metrics["geometry"].update(sp["emb"], tx["emb"])
        if "wer" in metrics:
            refs = [self.tokenizer.normalize(t) for t in batch["text"]]
            hyps = greedy_ctc_decode(sp["ctc_logits"], sp["lengths"], self.tokenizer)
            metrics["wer"].update(hyps, refs)
            metrics["cer"].update(hyps, refs)
            self._update_onsets(metrics["onset"], batch, sp, tx, refs)

    def _update_onsets(self, metric, batch: dict, sp: dict, tx: dict, refs: list[str]) -> None:
        from .align import ctc_forced_align, proportional_onsets, word_onset_frames

        metas = batch.get("meta") or []
        keep = [i for i, m in enumerate(metas) if isinstance(m, dict) and m.get("onsets") and "duration" in m
                and len(m["onsets"]) == len(refs[i].split())]
        if not keep:
            return
        tokens = self._tokens(batch)
        log_probs = F.log_softmax(sp["ctc_logits"].float(), -1)
        states, feasible = ctc_forced_align(log_probs, sp["lengths"], tokens, tx["lengths"])
        pred, true, base = [], [], []
        for i in keep:
            if not bool(feasible[i]):  # too few frames for the transcript: no alignment exists
                continue
            frames = word_onset_frames(states[i], int(sp["lengths"][i]), refs[i])
            pred += [f * self.seconds_per_frame for f in frames]
            true += list(metas[i]["onsets"])
            base += proportional_onsets(refs[i], float(metas[i]["duration"]))
        if pred:
            as_t = lambda v: torch.tensor(v, dtype=torch.float64, device=self.device)  # noqa: E731
            metric.update(as_t(pred), as_t(true), as_t(base))

    def on_fit_end(self) -> None:
        self.print_final_metrics()

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        from mmalign.optim import adamw_warmup_cosine

        h = self.hparams
        return adamw_warmup_cosine(self.named_parameters(), self.trainer.estimated_stepping_batches, h.lr,
                                   h.weight_decay, h.betas, warmup_steps=h.warmup_steps)
