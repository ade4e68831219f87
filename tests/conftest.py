"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test saying which file is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the shared/ folder beside the checkout)")
    return path


@pytest.fixture
def cdiscount_taxonomy_csv() -> Path:
    return shared_file("cdiscount", "category_names.csv")


@pytest.fixture
def cdiscount_sample_bson() -> Path:
    return shared_file("cdiscount", "train_example.bson")


@pytest.fixture
def fashion_dir() -> Path:
    return shared_file("fashion")
