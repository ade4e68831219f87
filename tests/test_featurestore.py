from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hierclass.featurestore import BAD, OK, FeatureStore, FeatureStoreError


def make(tmp_path: Path, n: int = 5) -> FeatureStore:
    return FeatureStore.create(
        tmp_path / "f",
        dim=3,
        product_id=np.arange(n) // 2,
        image_number=np.arange(n) % 2,
        leaf=np.arange(n) % 3,
        meta={"taxonomy_fingerprint": "abc"},
        views=("orig", "hflip"),
    )


def test_write_resume_complete(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.write(np.array([0, 1]), {"orig": np.ones((2, 3)), "hflip": np.zeros((2, 3))}, np.array([OK, BAD]))
    with pytest.raises(FeatureStoreError, match="extraction has not finished"):
        FeatureStore.open(tmp_path / "f")
    resumed = FeatureStore.open(tmp_path / "f", mode="r+", require_complete=False)
    assert resumed.pending.tolist() == [2, 3, 4]
    rows = resumed.pending
    resumed.write(rows, {"orig": np.full((3, 3), 2.0), "hflip": np.zeros((3, 3))}, np.full(3, OK))
    resumed.mark_complete()
    done = FeatureStore.open(tmp_path / "f")
    assert done.meta["n_bad"] == 1 and done.meta["complete"]
    assert done.valid.tolist() == [True, False, True, True, True]
    assert done.features().dtype == np.float16
    assert done.features()[0].tolist() == [1, 1, 1] and done.features()[4].tolist() == [2, 2, 2]
    assert done.product_id.tolist() == [0, 0, 1, 1, 2]
    done.check_taxonomy("abc")
    with pytest.raises(FeatureStoreError, match="labelled with taxonomy abc"):
        done.check_taxonomy("xyz")


def test_refuses_overwrite_and_missing(tmp_path: Path) -> None:
    make(tmp_path)
    with pytest.raises(FeatureStoreError, match="exists already"):
        make(tmp_path)
    with pytest.raises(FeatureStoreError, match="meta.json missing"):
        FeatureStore.open(tmp_path / "nothing")


def test_a_full_disk_is_a_clean_error_before_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the feature files were sparse memory maps, and a full disk killed extraction with SIGBUS."""
    import errno
    import os

    from hierclass.errors import OutputError

    store = make(tmp_path)  # the files are allocated, not sparse
    size = os.stat(store.root / "features.npy").st_size
    assert os.stat(store.root / "features.npy").st_blocks * 512 >= size - 4096

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match=r"features.npy: No space left on device; the disk is full.*needs \d+ B"):
        FeatureStore.create(
            tmp_path / "g", dim=3, product_id=np.arange(4), image_number=np.zeros(4, int), leaf=np.zeros(4, int),
            meta={"taxonomy_fingerprint": "abc"},
        )  # fmt: skip
    assert not (tmp_path / "g" / "meta.json").exists()


def test_products_are_told_apart_by_their_row(tmp_path: Path) -> None:
    """``product_row`` is stored; without it, a product is its ``product_id``'s rank among the store's."""
    store = FeatureStore.create(
        tmp_path / "f", dim=2, product_id=np.array([7, 7, 3, 7]), image_number=np.array([0, 1, 0, 0]),
        leaf=np.zeros(4, int), meta={"taxonomy_fingerprint": "abc"}, product_row=np.array([0, 0, 1, 2]),
    )  # fmt: skip
    assert FeatureStore.open(tmp_path / "f", require_complete=False).product_row.tolist() == [0, 0, 1, 2]
    index = dict(np.load(store.root / "images.npz"))
    del index["product_row"]  # a store written before product_row was recorded
    np.savez(store.root / "images.npz", **index)
    assert FeatureStore.open(tmp_path / "f", require_complete=False).product_row.tolist() == [1, 1, 0, 1]
    assert make(tmp_path / "g").product_row.tolist() == [0, 0, 1, 1, 2]  # not given: the ids' ranks
    with pytest.raises(ValueError, match="one entry per image"):
        FeatureStore.create(
            tmp_path / "h", dim=2, product_id=np.arange(3), image_number=np.zeros(3, int), leaf=np.zeros(3, int),
            meta={"taxonomy_fingerprint": "abc"}, product_row=np.arange(2),
        )  # fmt: skip
