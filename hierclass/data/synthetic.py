"""Small generated images and dumps, for tests and examples (no real data needed)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def make_jpeg(seed: int = 0, size: tuple[int, int] = (32, 24), quality: int = 90) -> bytes:
    """A small random-noise RGB JPEG, different for each seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def synthetic_products(
    n_products: int, n_categories: int = 3, max_images: int = 3, seed: int = 0, size: tuple[int, int] = (32, 24)
) -> list[tuple[int, int, list[bytes]]]:
    """``n_products`` products ``(_id, category_id, [JPEG bytes, ...])`` for :func:`write_dump`.

    Product ``k`` has ``_id`` 1000 + k, category_id 10 + (k mod n_categories) and
    1 + (k mod max_images) images.
    """
    products = []
    for k in range(n_products):
        jpegs = [make_jpeg(seed * 100_000 + k * 10 + j, size) for j in range(1 + k % max_images)]
        products.append((1000 + k, 10 + k % n_categories, jpegs))
    return products
