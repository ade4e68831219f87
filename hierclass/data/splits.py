"""Product-level train / validation splits, stratified by leaf."""

from __future__ import annotations

from pathlib import Path

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


def split_dump(
    dump: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.15,
    seed: int = 0,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Split a labelled dump into ``out_dir/train.bson`` and ``out_dir/val.bson`` by product.

    The products are split by :func:`split_products` (stratified by category_id, the same
    split for the same seed); each document is copied byte for byte through the dump's
    offset index, in dump order, so a product never straddles the two files. Both files
    appear only when complete.

    Args:
        dump: a Cdiscount-format ``.bson`` dump.
        out_dir: the folder for ``train.bson`` and ``val.bson`` (made if missing).
        val_fraction: the share of each category's products sent to ``val.bson``, in ``[0, 1)``.
        seed: the random seed of the split.
        cache_dir: where to keep the dump's index file (default: beside the dump).
        progress: show progress bars (indexing, copying) on stderr.

    Returns:
        Counts: ``train`` and ``val`` products, ``train_images`` and ``val_images``.

    Raises:
        DumpError: the dump is missing or not a ``.bson`` dump.
        ValueError: ``val_fraction`` is outside ``[0, 1)``.
    """
    from tqdm import tqdm

    from hierclass.atomic import atomic_open
    from hierclass.data.sources import BsonDump
    from hierclass.errors import DumpError

    dump, out = Path(dump), Path(out_dir)
    if dump.suffix.lower() != ".bson":
        raise DumpError(f"{dump}: not a .bson dump; `hierclass import` turns image files into one")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if dump.resolve() in {(out / "train.bson").resolve(), (out / "val.bson").resolve()}:
        raise DumpError(f"{dump}: the split would overwrite the dump it reads; pass another output folder")
    source = BsonDump.open(dump, cache_dir=cache_dir, progress=progress)
    train_rows, val_rows = split_products(source.category_ids, val_fraction=val_fraction, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(source), unit="product", desc="split", disable=not progress, leave=False) as bar:
        for name, rows in (("train", train_rows), ("val", val_rows)):
            with atomic_open(out / f"{name}.bson", "wb", buffering=1 << 20) as f:
                for p in rows:
                    f.write(source.read_bytes(int(p)))
                    bar.update()
    return {
        "train": len(train_rows),
        "val": len(val_rows),
        "train_images": int(source.n_images[train_rows].sum()),
        "val_images": int(source.n_images[val_rows].sum()),
    }
