"""Test-time adaptation (TTA) for mmalign.

- ``corruptions`` / ``corrupt_shards``: the CIFAR-10-C style shifts (15 corruptions x 5 severities)
  and their webdataset shards.
- ``models``: the model interface (images -> logits, plus penultimate features) and source loading.
- ``norms``: which norm layers adapt; BatchNorm on test-batch statistics.
- ``losses`` / ``methods``: source, norm, tent, tent_filter (wisdom of crowds), cafa in plain torch.
- ``cafa_stats``: CAFA's source class-conditional Gaussians.
- ``stream`` / ``report`` / ``module`` / ``adapt_command``: the test stream, outputs, the config's
  model and ``python -m mmalign adapt``.
Nothing is imported here so that importing one piece stays cheap (no timm at import).
"""
