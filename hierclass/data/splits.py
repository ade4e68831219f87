"""Product-level train / validation splits, stratified by leaf."""

from __future__ import annotations

import numpy as np


def split_products(category_ids: np.ndarray, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split product rows into train and validation, stratified by category.

    Each category (leaf) sends about ``val_fraction`` of its products to validation: the
    expected count ``n * val_fraction`` is rounded up or down at random (so the overall
    fraction is right even with many small leaves) and capped at ``n - 1``, so every leaf
    keeps a product in train; a leaf with a single product goes to train. Rows are split, so
    a product's images never straddle the split. The same inputs and seed give the same split.

    Args:
        category_ids: one label per product row (category_id or leaf index; -1 is a label too).
        val_fraction: the share of each leaf's products to hold out, in ``[0, 1)``.
        seed: the random seed.

    Returns:
        ``(train_rows, val_rows)``, sorted int64 product rows.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(category_ids).ravel()
    if len(labels) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    _, group, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    want = sizes * val_fraction
    n_val = np.floor(want + rng.random(len(sizes))).astype(np.int64)
    n_val = np.minimum(n_val, sizes - 1)
    # Rank each row inside its group in a random order: shuffle, then stable-sort by group.
    order = rng.permutation(len(labels))
    order = order[np.argsort(group[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - np.repeat(starts, sizes)
    is_val = rank < n_val[group]
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def holdout_mask(product_id: np.ndarray, labels: np.ndarray, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Hold out a stratified ``fraction`` of the products behind a set of image rows.

    The one split carved from a training set, for early stopping and calibration: image rows
    are grouped by product (a product's images never straddle the split), each product takes
    the label of its first image, and :func:`split_products` picks the held-out products.

    Args:
        product_id: one product id per image row.
        labels: one label per image row (leaf index; -1 is a label too).
        fraction: the share of each label's products to hold out, in ``[0, 1)``.
        seed: the random seed.

    Returns:
        A boolean mask over the image rows: True for held-out rows.
    """
    product_id = np.asarray(product_id).ravel()
    labels = np.asarray(labels).ravel()
    if len(product_id) != len(labels):
        raise ValueError(f"product_id has {len(product_id)} rows but labels has {len(labels)}")
    if len(product_id) == 0:
        return np.zeros(0, dtype=bool)
    products, first, inverse = np.unique(product_id, return_index=True, return_inverse=True)
    _, held_products = split_products(labels[first], val_fraction=fraction, seed=seed)
    held = np.zeros(len(products), dtype=bool)
    held[held_products] = True
    return held[inverse.ravel()]
