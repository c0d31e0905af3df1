"""Speech-text alignment.

``features``: waveform -> log-mel frames (own mel filterbank on ``torch.stft``), per-utterance
normalisation, SpecAugment, padding/length helpers and ``check_clip`` for the data pipeline.
``synth``: a small spoken dataset synthesised with espeak-ng, with word onsets from the
synthesiser's own word events, written as webdataset shards (see ``scripts/make_spoken.py``).
``tokenizer``: character vocabulary (id 0 = padding = CTC blank). ``model``: speech/text encoders.
``align``: CTC forced alignment. ``metrics``: CTC decoding, transcript ids, onset error.
``module``: the ``SpeechTextAligner`` LightningModule (exported here for short CLI class names;
it imports only torch/lightning at module level).
"""

from .module import SpeechTextAligner

__all__ = ["SpeechTextAligner"]
