"""Shared test set-up: offline, deterministic, small."""

import os

# Tests never download: hub calls fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ANYGEN_SLOW=1."""
    if os.environ.get("ANYGEN_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: set ANYGEN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
