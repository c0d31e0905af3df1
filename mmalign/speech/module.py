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

from types import SimpleNamespace

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from datamodules.base import Preprocess
from mmalign.specs import OptimSpec, coerce, store_specs
from mmalign.training.spec_module import ClipsGradients, ReadsFlatCheckpoints
from mmalign.training.eval_scaffold import EvalScaffold

from .specs import (DEFAULT_SPEC_AUGMENT, SPEECH_MOVED, SPEECH_OPTIM, SpeechEvalSpec, SpeechFeatureSpec, SpeechLossSpec,
                    TowerSpec)
from .tokenizer import CharTokenizer


class SpeechTextAligner(ReadsFlatCheckpoints, ClipsGradients, EvalScaffold, pl.LightningModule):
    """Speech-text alignment with contrastive, CTC and best-alignment consistency losses.

    Args:
        towers: Speech and text encoders: widths, depths, shared blocks, block kind (``specs.TowerSpec``).
        features: Log-mel front end, SpecAugment, character alphabet (``specs.SpeechFeatureSpec``).
        losses: Contrastive / CTC / consistency weights and settings (``specs.SpeechLossSpec``).
        optim: AdamW, warm-up, schedule (``mmalign.specs.OptimSpec``; default lr 1e-3, weight decay
            0.05 on matrices only, betas (0.9, 0.98), cosine).
        eval: Retrieval chunk and onset tolerance (``specs.SpeechEvalSpec``).
    """

    moved_options = SPEECH_MOVED

    def __init__(
        self,
        towers: TowerSpec = TowerSpec(),
        features: SpeechFeatureSpec = SpeechFeatureSpec(),
        losses: SpeechLossSpec = SpeechLossSpec(),
        optim: OptimSpec = SPEECH_OPTIM,
        eval: SpeechEvalSpec = SpeechEvalSpec(),
    ) -> None:
        super().__init__()
        self.cfg = cfg = SimpleNamespace(
            towers=coerce(towers, TowerSpec, "towers"), features=coerce(features, SpeechFeatureSpec, "features"),
            losses=coerce(losses, SpeechLossSpec, "losses"),
            optim=coerce(optim, OptimSpec, "optim", base=SPEECH_OPTIM),
            eval=coerce(eval, SpeechEvalSpec, "eval"))
        self.save_hyperparameters()
        store_specs(self, vars(cfg))  # plain mappings: checkpoints load with weights_only=True
        from mmalign.losses.contrastive import init_logit_scale as make_scale
        from mmalign.speech.consistency import AlignmentConsistencyLoss
        from mmalign.speech.multipositive import MultiPositiveContrastiveLoss

        from .features import SpecAugment
        from .model import SpeechFrontend, SpeechTextModel

        f, t, lo = cfg.features, cfg.towers, cfg.losses
        self.tokenizer = CharTokenizer(f.alphabet, f.max_text_length)
        augment = SpecAugment(**(DEFAULT_SPEC_AUGMENT | dict(f.spec_augment_kwargs or {}))) if f.spec_augment else None
        self.frontend = SpeechFrontend(f.sample_rate, f.n_mels, augment)
        self.model = SpeechTextModel(self.tokenizer.vocab_size, t.d_model, t.embed_dim, t.speech_layers, t.text_layers,
                                     t.shared_layers, t.heads, t.speech_block, f.n_mels, t.dropout, t.conv_kernel)
        self.logit_scale = make_scale("clip", lo.init_logit_scale)
        self.contrastive = MultiPositiveContrastiveLoss(lo.multi_positive)
        self.consistency = AlignmentConsistencyLoss(lo.consistency_mode, lo.consistency_gamma, lo.consistency_cost,
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
        h = self.cfg.losses
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

        clamp_logit_scale_(self.logit_scale.data, self.cfg.losses.max_logit_scale)

    # ---- evaluation (mmalign.training.eval_scaffold) -----------------------------------------
    eval_progress_keys = ("speech2text_r1",)
    _RENAME = {"i2t": "text2speech", "t2i": "speech2text"}

    def build_eval_metrics(self, split: str) -> dict:
        from torchmetrics.text import CharErrorRate, WordErrorRate

        from mmalign.evaluation import EmbeddingGeometry, RetrievalRecall

        from .metrics import OnsetError

        m = {"retrieval": RetrievalRecall(chunk_size=self.cfg.eval.retrieval_chunk_size),
             "geometry": EmbeddingGeometry(max_samples=4096)}
        if self.cfg.losses.ctc_weight > 0:
            m.update(wer=WordErrorRate(), cer=CharErrorRate(), onset=OnsetError(self.cfg.eval.onset_tolerance_ms))
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
        return self.cfg.optim.build(self.named_parameters(), self.trainer.estimated_stepping_batches)
