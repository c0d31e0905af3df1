import os

# Tests never reach a model hub: a stray call would otherwise burn ~45 s in retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Small versions of the built-in datasets (shapes, digits, spoken), shared by config and CLI tests.

    Configs read ``${oc.env:MMALIGN_DATA,data}``; tests point MMALIGN_DATA here so the datamodules
    find complete datasets and skip generation.
    """
    from datamodules.generate import generate_dataset

    root = tmp_path_factory.mktemp("data")
    generate_dataset("digits", str(root / "digits"))
    generate_dataset("shapes", str(root / "shapes"), num_train=400, num_val=64, num_test=64, num_heldout=64,
                     shard_size=50)
    generate_dataset("spoken", str(root / "spoken"), num_train=32, num_test=8, num_val=8, shard_size=8)
    return str(root)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, data_root):
    """Run in an empty working directory (runs/ lands there) with MMALIGN_DATA set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMALIGN_DATA", data_root)
    return tmp_path
