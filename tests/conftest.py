"""Shared test fixtures. Tests read real data from ../shared/data and skip cleanly when it is absent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import shared_data_dir

# Each xdist worker gets one intra-op thread: two workers on two cores, no oversubscription.
torch.set_num_threads(int(os.environ.get("LMFORGE_TEST_THREADS", "1")))

DATA = shared_data_dir()
# Per-machine records (lmforge.training.cores' matmul pick) go to a throwaway directory, not the user's ~/.cache.
os.environ.setdefault("LMFORGE_CACHE", tempfile.mkdtemp(prefix="lmforge-test-cache-"))


def data_file(rel: str) -> Path:
    """Path of a file in the shared data directory, or skip the test with a clear reason."""
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"shared data file {p} is absent")
    return p


@pytest.fixture
def shared_data():
    return data_file
