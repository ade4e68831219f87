"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

from collections.abc import Callable
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
def jpeg_sample_bson() -> Path:
    """Product JPEGs for the tests that compare decoding and resizing with Pillow and timm: the real
    Cdiscount sample when ../shared/data has it, else the committed tiny dump made by
    tests/fixtures/make_fixtures.py (synthetic images of several sizes and JPEG variants)."""
    real = SHARED_DATA / "cdiscount" / "train_example.bson"
    return real if real.is_file() else REPO / "tests" / "fixtures" / "jpeg_sample.bson"


@pytest.fixture
def fashion_dir() -> Path:
    return shared_file("fashion")


@pytest.fixture
def eval_config() -> Callable[[int], dict]:
    """A timm data config at ``size`` px like EfficientNet-Lite0's (bicubic, crop_pct 0.875, centre
    crop), with mean and std 0.5: what the data tests give ``resolve_transform``."""

    def config(size: int) -> dict:
        return {
            "input_size": (3, size, size),
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        }

    return config
