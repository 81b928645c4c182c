"""Shared test fixtures: where ../shared lives, and deterministic torch settings."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_CXR = SHARED / "data" / "ieee8023-covid-cxr"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_cxr() -> Path:
    """The real CXR subset in ../shared; skips the test with a reason when it is absent."""
    if not (SHARED_CXR / "labels.csv").exists():
        pytest.skip(f"../shared data not found at {SHARED_CXR}")
    return SHARED_CXR
