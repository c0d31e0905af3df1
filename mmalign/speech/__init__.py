"""Speech front end for the speech-text methods.

``features``: waveform -> log-mel frames (own mel filterbank on ``torch.stft``), per-utterance
normalisation, SpecAugment, padding/length helpers and ``check_clip`` for the data pipeline.
``synth``: a small spoken dataset synthesised with espeak-ng, with word onsets from the
synthesiser's own word events, written as webdataset shards (see ``scripts/make_spoken.py``).

Submodules are imported where used, so importing this package costs nothing.
"""
