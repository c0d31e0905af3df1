"""Speech-text alignment.

``features``: waveform -> log-mel frames (own mel filterbank on ``torch.stft``), per-utterance
normalisation, SpecAugment, padding/length helpers. ``tokenizer``: character vocabulary (id 0 =
padding = CTC blank). ``model``: speech/text encoders. ``multipositive``: the contrastive loss
with every clip of a transcript a positive. ``consistency``: best-alignment (DTW / soft-DTW)
consistency between speech frames and text tokens. ``align``: CTC forced alignment.
``metrics``: CTC decoding, transcript ids, onset error. The spoken dataset itself is synthesised
by the data layer (``datamodules.generate.espeak``).
``module``: the ``SpeechTextAligner`` LightningModule (exported here for short CLI class names;
it imports only torch/lightning at module level).
"""

from .module import SpeechTextAligner

__all__ = ["SpeechTextAligner"]
