"""Test-time adaptation (TTA) for mmalign.

``mmalign.tta.corruptions`` builds the CIFAR-10-C style distribution shifts of the benchmark
(15 corruptions x 5 severities) and ``mmalign.tta.corrupt_shards`` writes them as webdataset
shards. Adaptation methods (TENT, the wisdom-of-crowds filter, CAFA) and the benchmark runner live
in their own modules beside these. Nothing is imported here so that importing one piece stays cheap.
"""
