"""Shared fixtures. Real-data tests find Flickr8k through CAPTIONER_DATA (default
../shared/datasets); they skip with a reason when it is absent, except under CI=true, where a
missing dataset is a failure."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("CAPTIONER_DATA", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def flickr8k_root() -> Path:
    root = data_root() / "flickr8k"
    if not (root / "Flickr8k.token.txt").is_file() or not (root / "images").is_dir():
        message = f"Flickr8k not found at {root} (set CAPTIONER_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root
