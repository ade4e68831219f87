"""Synthetic hierarchical features for tests and benchmarks.

Each leaf's mean is the sum of a level-1 offset, a level-2 offset and a leaf offset, so
leaves of one branch cluster together and leaves of one level-2 node cluster closer still:
the structure a router and its experts exploit. Images are leaf means plus Gaussian noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hierclass.featurestore import OK, FeatureStore
from hierclass.taxonomy import Taxonomy


def synthetic_means(
    taxonomy: Taxonomy,
    dim: int,
    rng: np.random.Generator,
    level1_scale: float = 3.0,
    level2_scale: float = 2.0,
    leaf_scale: float = 1.5,
) -> np.ndarray:
    """Leaf means ``[n_leaves, dim]`` (float32): level-1 + level-2 + leaf offsets.

    Each offset has i.i.d. N(0, scale**2 / dim) components, so the distance between two means
    differing at one level is about ``scale * sqrt(2)`` whatever ``dim`` is.
    """
    s = 1.0 / np.sqrt(dim)
    l1 = rng.normal(0, level1_scale * s, (taxonomy.n_level1, dim))
    l2 = rng.normal(0, level2_scale * s, (taxonomy.n_level2, dim))
    leaf = rng.normal(0, leaf_scale * s, (taxonomy.n_leaves, dim))
    return (l1[taxonomy.leaf_level1] + l2[taxonomy.leaf_level2] + leaf).astype(np.float32)


def make_synthetic_features(
    taxonomy: Taxonomy,
    n: int,
    dim: int,
    rng: np.random.Generator,
    *,
    means: np.ndarray | None = None,
    noise: float = 1.0,
    imbalance: float = 0.0,
    leaf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic images: features ``[n, dim]`` float32 and their leaf indices.

    Args:
        taxonomy: the tree the structure follows.
        n: the number of images.
        dim: the feature size.
        rng: the random source (features and labels depend only on it and the arguments).
        means: leaf means from :func:`synthetic_means` (drawn from ``rng`` when None); pass the
            same means to make train and validation sets of one problem.
        noise: the total noise norm is about ``noise`` (per-component std ``noise / sqrt(dim)``).
        imbalance: leaf frequencies follow a Zipf law ``rank ** -imbalance`` (0: uniform).
        leaf: the labels to use instead of drawing them.
    """
    if means is None:
        means = synthetic_means(taxonomy, dim, rng)
    if leaf is None:
        p = np.arange(1, taxonomy.n_leaves + 1, dtype=np.float64) ** -imbalance
        leaf = rng.choice(taxonomy.n_leaves, size=n, p=rng.permutation(p / p.sum()))
    leaf = np.asarray(leaf, dtype=np.int64)
    feats = means[leaf] + rng.normal(0, noise / np.sqrt(dim), (len(leaf), dim)).astype(np.float32)
    return feats.astype(np.float32), leaf


def write_synthetic_store(
    root: str | Path,
    taxonomy: Taxonomy,
    n: int,
    dim: int,
    seed: int = 0,
    *,
    means_seed: int = 0,
    noise: float = 1.0,
    imbalance: float = 0.0,
    leaf_weights: np.ndarray | None = None,
    level1_scale: float = 3.0,
    level2_scale: float = 2.0,
    leaf_scale: float = 1.5,
    images_per_product: int = 2,
    chunk: int = 16_384,
    meta: dict | None = None,
    progress: bool = False,
) -> FeatureStore:
    """A complete feature store of synthetic images, written in chunks (fits any ``n``; memory is O(chunk x dim)).

    Train and validation stores of one problem share ``means_seed`` (and the scales) and differ by ``seed``.
    ``product_id`` groups ``images_per_product`` consecutive images (same leaf).

    Args:
        root: the store's directory (must not hold a store).
        taxonomy: the tree the structure follows.
        n: the number of images.
        dim: the feature size.
        seed: draws the labels and the noise.
        means_seed: draws the leaf means (:func:`synthetic_means`).
        noise: total noise norm (per-component std ``noise / sqrt(dim)``).
        imbalance: Zipf exponent of the leaf frequencies (ignored when ``leaf_weights`` is given).
        leaf_weights: ``[n_leaves]`` leaf frequencies (e.g. real image counts; normalised here).
        level1_scale, level2_scale, leaf_scale: the structure's offset norms (see :func:`synthetic_means`).
        images_per_product: consecutive images per product.
        chunk: rows drawn and written at a time.
        meta: extra ``meta.json`` entries.
        progress: show a tqdm bar.
    """
    rng = np.random.default_rng(seed)
    means = synthetic_means(taxonomy, dim, np.random.default_rng(means_seed), level1_scale, level2_scale, leaf_scale)
    n_products = -(-n // images_per_product)
    if leaf_weights is None:
        p = rng.permutation(np.arange(1, taxonomy.n_leaves + 1, dtype=np.float64) ** -imbalance)
    else:
        p = np.asarray(leaf_weights, dtype=np.float64)
        if p.shape != (taxonomy.n_leaves,) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(
                f"leaf_weights must be {taxonomy.n_leaves} non-negative numbers, not all zero; got shape {p.shape}"
            )
    product_leaf = rng.choice(taxonomy.n_leaves, size=n_products, p=p / p.sum())
    product_id = np.arange(n) // images_per_product + seed * 10_000_000
    leaf = product_leaf[np.arange(n) // images_per_product]
    store = FeatureStore.create(
        root,
        dim=dim,
        product_id=product_id,
        image_number=np.arange(n) % images_per_product,
        leaf=leaf,
        meta={"taxonomy_fingerprint": taxonomy.fingerprint, "backbone": "synthetic", **(meta or {})},
    )
    for start in tqdm(range(0, n, chunk), desc=f"synthetic {Path(root).name}", unit="chunk", disable=not progress):
        rows = np.arange(start, min(n, start + chunk))
        # float32 normals: half the time and memory of make_synthetic_features' float64 ones, the same distribution.
        feats = rng.standard_normal((len(rows), dim), dtype=np.float32)
        feats *= noise / np.sqrt(dim)
        feats += means[leaf[rows]]
        store.write(rows, {"orig": feats}, np.full(len(rows), OK, dtype=np.int8))
    store.mark_complete()
    return FeatureStore.open(root)
