"""The on-disk feature cache: one float16 row per image, memory-mapped, resumable.

A feature directory holds::

    meta.json          what made the features (backbone, preprocessing, data source,
                       taxonomy fingerprint), the shapes, and ``complete``
    features.npy       float16 [n_images, dim], the pooled backbone features
    features_hflip.npy optional, the same for horizontally flipped images (test-time aug.)
    images.npz         per image: product_id, product_row, image_number, leaf (-1: unlabelled or unknown)
    status.npy         int8 [n_images]: 0 not done yet, 1 ok, 2 bad image (skipped, counted)

Writers fill rows in any order, flush the features, then set ``status``; so a job killed
midway resumes at the rows whose status is still 0 and never trusts a half-written row.
Readers use :attr:`FeatureStore.valid` to drop bad images.

Images are grouped into products by ``product_row`` (the product's row in its source), not by
``product_id`` (the ``_id`` written to submissions): a dump may give two products one ``_id``,
and they stay two products. A store written before ``product_row`` was recorded groups its
images by ``product_id``, as it always did.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hierclass.atomic import atomic_open
from hierclass.errors import HierclassError, OutputError
from hierclass.outputs import os_error_message

FORMAT_VERSION = 1
PENDING, OK, BAD = 0, 1, 2
VIEWS = ("orig", "hflip")


class FeatureStoreError(HierclassError):
    """A feature directory is missing, incomplete or was made for other data."""


def _view_file(view: str) -> str:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return "features.npy" if view == "orig" else f"features_{view}.npy"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)


def _preallocated_memmap(path: Path, dtype: type, shape: tuple[int, ...]) -> None:
    """Create a ``.npy`` file of zeros whose blocks are all allocated on the disk now.

    A memory-mapped file is sparse until written; on a full disk the write of a page kills the
    process with SIGBUS and no message. Allocating first turns a full disk into a clean error,
    before any work.

    Raises:
        OutputError: the disk has not enough free space (or the file cannot be written).
    """
    try:
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                        raise  # a file system that cannot preallocate is left as it is
        finally:
            os.close(fd)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        with contextlib.suppress(OSError):
            path.unlink()
        raise OutputError(f"{os_error_message(e)} (the feature folder needs {_size_text(shape, dtype)})") from None


def _size_text(shape: tuple[int, ...], dtype: type) -> str:
    """The size of an array as text, e.g. ``'1.2 GB'``."""
    n = float(np.prod(shape, dtype=np.float64) * np.dtype(dtype).itemsize)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def id_ranks(product_id: np.ndarray) -> np.ndarray:
    """The rank of each image's ``product_id`` among the distinct ones: a product row per image
    when each ``_id`` is one product (the grouping of stores that do not record ``product_row``)."""
    return np.unique(product_id, return_inverse=True)[1].reshape(-1).astype(np.int64)


class FeatureStore:
    """A feature directory opened for reading or (re)writing.

    Attributes:
        root: the directory.
        meta: the content of ``meta.json``.
        product_id, image_number, leaf: per-image index arrays (int64).
        product_row: per image, the row of its product in the source (int64); products are
            told apart by it. For a store that does not record it, the rank of the image's
            ``product_id`` among the store's (its images are grouped by ``_id``).
        status: per-image state, memory-mapped (PENDING, OK or BAD).
    """

    def __init__(self, root: Path, meta: dict[str, Any], mode: str) -> None:
        self.root = root
        self.meta = meta
        self._mode = mode
        index = np.load(root / "images.npz")
        self.product_id = index["product_id"]
        self.product_row = index["product_row"] if "product_row" in index.files else id_ranks(self.product_id)
        self.image_number = index["image_number"]
        self.leaf = index["leaf"]
        self.status = np.load(root / "status.npy", mmap_mode=mode)
        self._views: dict[str, np.memmap] = {}

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        root: str | Path,
        *,
        dim: int,
        product_id: np.ndarray,
        image_number: np.ndarray,
        leaf: np.ndarray,
        meta: Mapping[str, Any],
        views: tuple[str, ...] = ("orig",),
        product_row: np.ndarray | None = None,
    ) -> FeatureStore:
        """Create an empty store for ``len(product_id)`` images (every row PENDING).

        Args:
            root: the directory (created; must not hold a store already).
            dim: the feature size.
            product_id, image_number, leaf: one entry per image row.
            meta: what made the features; must include ``taxonomy_fingerprint``.
            views: ``("orig",)`` or ``("orig", "hflip")``.
            product_row: per image, the row of its product in the source, which tells apart
                products that share a ``product_id``; None: the rank of ``product_id`` (one
                product per id).
        """
        root = Path(root)
        if (root / "meta.json").exists():
            raise FeatureStoreError(f"{root}: a feature store exists already; open it to resume, or remove the folder")
        n = len(product_id)
        if product_row is None:
            product_row = id_ranks(np.asarray(product_id, dtype=np.int64))
        if not (len(image_number) == len(leaf) == len(product_row) == n):
            raise ValueError("product_id, product_row, image_number and leaf must have one entry per image")
        root.mkdir(parents=True, exist_ok=True)
        np.savez(
            root / "images.npz",
            product_id=np.asarray(product_id, dtype=np.int64),
            product_row=np.asarray(product_row, dtype=np.int64),
            image_number=np.asarray(image_number, dtype=np.int64),
            leaf=np.asarray(leaf, dtype=np.int64),
        )
        for view in views:
            _preallocated_memmap(root / _view_file(view), np.float16, (n, dim))
        _preallocated_memmap(root / "status.npy", np.int8, (n,))
        full_meta = {
            **dict(meta),
            "format_version": FORMAT_VERSION,
            "n_images": n,
            "dim": int(dim),
            "views": list(views),
            "complete": False,
        }
        write_json_atomic(root / "meta.json", full_meta)
        return cls(root, full_meta, "r+")

    @classmethod
    def open(cls, root: str | Path, mode: str = "r", require_complete: bool = True) -> FeatureStore:
        """Open an existing store.

        Args:
            root: the directory.
            mode: ``"r"`` to read, ``"r+"`` to resume writing.
            require_complete: refuse a store whose extraction has not finished.

        Raises:
            FeatureStoreError: missing, from another format version, or incomplete.
        """
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise FeatureStoreError(
                f"{root}: no feature store here (meta.json missing); make one with `hierclass extract-features`"
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise FeatureStoreError(
                f"{meta_path}: feature format {meta.get('format_version')} is not {FORMAT_VERSION}; extract again"
            )
        if require_complete and not meta.get("complete"):
            raise FeatureStoreError(
                f"{root}: extraction has not finished; run the same `hierclass extract-features` again to resume it"
            )
        return cls(root, meta, mode)

    # ------------------------------------------------------------------ reading
    @property
    def n_images(self) -> int:
        return int(self.meta["n_images"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def taxonomy_fingerprint(self) -> str | None:
        return self.meta.get("taxonomy_fingerprint")

    def features(self, view: str = "orig") -> np.memmap:
        """The float16 feature matrix of one view, memory-mapped (not loaded)."""
        if view not in self._views:
            if view not in self.meta["views"]:
                raise FeatureStoreError(f"{self.root}: no {view!r} features; extract with that view to get them")
            self._views[view] = np.load(self.root / _view_file(view), mmap_mode=self._mode)
        return self._views[view]

    @property
    def valid(self) -> np.ndarray:
        """Rows whose image decoded and whose features were written."""
        return np.asarray(self.status) == OK

    @property
    def pending(self) -> np.ndarray:
        """Indices of the rows not written yet (what a resumed extraction still has to do)."""
        return np.flatnonzero(np.asarray(self.status) == PENDING)

    def check_taxonomy(self, fingerprint: str, what: str = "the taxonomy") -> None:
        """Refuse features labelled with another taxonomy than ``fingerprint``."""
        if self.taxonomy_fingerprint != fingerprint:
            raise FeatureStoreError(
                f"{self.root}: features were labelled with taxonomy {self.taxonomy_fingerprint}, "
                f"{what} is {fingerprint}; extract the features again with the same category_names.csv"
            )

    # ------------------------------------------------------------------ writing
    def write(self, rows: np.ndarray, features: Mapping[str, np.ndarray], status: np.ndarray) -> None:
        """Write a batch of rows: features of every view first (flushed), then their status."""
        for view, values in features.items():
            mm = self.features(view)
            mm[rows] = values.astype(np.float16, copy=False)
            mm.flush()
        self.status[rows] = status
        self.status.flush()

    def mark_complete(self, **extra: Any) -> None:
        """Record that every row is written, with summary figures (e.g. bad-image count)."""
        if len(self.pending):
            raise FeatureStoreError(f"{self.root}: {len(self.pending)} rows are still pending")
        self.meta.update(extra, complete=True, n_bad=int((np.asarray(self.status) == BAD).sum()))
        write_json_atomic(self.root / "meta.json", self.meta)


def float32_rows(features: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """``features[rows]`` as a new float32 array: float16 rows are converted by torch, about 6x faster than numpy."""
    part = features[rows]
    if part.dtype != np.float16:
        return np.array(part, dtype=np.float32)
    import torch

    return torch.from_numpy(np.array(part)).float().numpy()
