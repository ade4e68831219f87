"""Image sources: a Cdiscount BSON dump, a CSV catalogue or one folder per category.

All three implement :class:`ImageSource`: per-product arrays (``product_ids``,
``category_ids``, ``n_images``) and ``read_images(p)``, the JPEG bytes of product row ``p``.
Each process opens its own file handle lazily (on first use, and again after a fork), so a
source can be handed to DataLoader worker processes as is.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import bson
import numpy as np

from hierclass.atomic import atomic_open
from hierclass.data.bson_index import BsonIndex, IndexReport, build_index
from hierclass.errors import DumpError

if TYPE_CHECKING:
    from hierclass.taxonomy import Taxonomy

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""File suffixes a folder catalogue takes as images (case-insensitive); other files are ignored."""


@runtime_checkable
class ImageSource(Protocol):
    """Products with images, addressed by product row ``0 .. len(source) - 1``.

    Attributes:
        path: the dump, CSV file or folder.
        product_ids: int64 ``[n_products]``, the ``_id`` of each product.
        category_ids: int64 ``[n_products]``, -1 where the source has no category_id.
        n_images: int64 ``[n_products]``, images per product (at least 1).
    """

    path: Path
    product_ids: np.ndarray
    category_ids: np.ndarray
    n_images: np.ndarray

    def __len__(self) -> int:
        """The number of products."""
        ...

    def read_images(self, p: int) -> list[bytes]:
        """The image bytes (JPEG for a dump) of product row ``p``, in order."""
        ...


# ---------------------------------------------------------------------- BSON dump
class BsonDump:
    """Random access to the products of a Cdiscount BSON dump through its offset index.

    Build it with :func:`open_source` or :meth:`open`. Reading product ``p`` is one
    ``pread`` of its document and one ``bson.decode``; nothing else of the dump is read.

    Attributes:
        path: the dump.
        index: the offset index (offsets, lengths and the per-product arrays).
        report: what indexing found (skipped documents, where a truncated dump stopped).
    """

    def __init__(self, path: str | Path, index: BsonIndex) -> None:
        self.path = Path(path)
        self.index = index
        self.report: IndexReport = index.report
        self.product_ids = index.product_id
        self.category_ids = index.category_id
        self.n_images = index.n_images
        self._fd: int | None = None
        self._pid: int | None = None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        strict: bool = False,
    ) -> BsonDump:
        """Open a dump, building its index or reusing a still-valid index file.

        Raises:
            DumpError: the dump is missing, or (``strict``) damaged.
        """
        return cls(path, build_index(path, cache_dir=cache_dir, progress=progress, strict=strict))

    def __len__(self) -> int:
        return len(self.index)

    def problems(self) -> list[str]:
        """One line per problem indexing found (empty for a sound dump)."""
        return self.report.problems()

    def _handle(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            # After a fork the inherited descriptor shares its offset with the parent; pread
            # ignores the offset, but a descriptor of our own also survives the parent closing it.
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = pid
        return self._fd

    def read_bytes(self, p: int) -> bytes:
        """The raw BSON document of product row ``p``."""
        offset, length = int(self.index.offset[p]), int(self.index.length[p])
        fd = self._handle()
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise DumpError(
                f"{self.path}:{offset}: document of {length} bytes cut short at {len(data)}; the dump changed "
                "since it was indexed, open it again"
            )
        return data

    def read_document(self, p: int) -> dict:
        """The decoded document of product row ``p`` (``_id``, ``category_id``, ``imgs``)."""
        try:
            return bson.decode(self.read_bytes(p))
        except bson.errors.InvalidBSON as e:
            raise DumpError(
                f"{self.path}:{int(self.index.offset[p])}: undecodable document ({e}); the dump changed since it "
                "was indexed or is damaged, open it again"
            ) from None

    def read_images(self, p: int) -> list[bytes]:
        """The JPEG bytes of product row ``p``, in the order of its ``imgs`` array."""
        return [img["picture"] for img in self.read_document(p)["imgs"]]

    def close(self) -> None:
        """Close this process's file handle (it reopens on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None  # each process opens its own handle
        return state

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BsonDump({str(self.path)!r}: {len(self)} products, {int(self.n_images.sum())} images)"


# ---------------------------------------------------------------------- image files
class _FileCatalogue:
    """Products made of image files; the base of :class:`CsvCatalogue` and :class:`FolderCatalogue`."""

    def __init__(self, path: Path, files: list[Path], owner: np.ndarray, product_ids, category_ids, warnings) -> None:
        # ``files`` are grouped by product: product p owns files[start[p]:start[p + 1]].
        self.path = path
        self.files = files
        self.skus: list[str] | None = None
        if any(isinstance(pid, str) for pid in product_ids):  # SKUs: integer _ids are the product rows
            self.skus = [pid if isinstance(pid, str) else None for pid in product_ids]
            product_ids = range(len(product_ids))
        self.product_ids = np.asarray(product_ids, dtype=np.int64)
        self.category_ids = np.asarray(category_ids, dtype=np.int64)
        self.n_images = np.bincount(owner, minlength=len(self.product_ids)).astype(np.int64)
        self._start = np.concatenate([[0], np.cumsum(self.n_images)]).astype(np.int64)
        self.warnings: list[str] = warnings

    def __len__(self) -> int:
        return len(self.product_ids)

    def problems(self) -> list[str]:
        """One line per problem found when the catalogue was opened."""
        return list(self.warnings)

    def image_files(self, p: int) -> list[Path]:
        """The image files of product row ``p``."""
        return self.files[self._start[p] : self._start[p + 1]]

    def read_images(self, p: int) -> list[bytes]:
        """The bytes of the image files of product row ``p``; an unreadable file gives ``b""``,
        which the datasets count as a bad image."""
        out = []
        for f in self.image_files(p):
            try:
                out.append(f.read_bytes())
            except OSError:
                out.append(b"")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}: {len(self)} products, {len(self.files)} images)"


def _group(
    path: Path, rows: list[tuple[int, Path, int | str | None, int]], strict: bool, warnings: list[str]
) -> tuple[list[Path], np.ndarray, list[int | str], list[int]]:
    """Group rows ``(line, file, product_id (an int or a SKU) or None, category_id)`` into products.

    A row without a product_id is a product of its own; rows sharing a product_id form one
    product, in order of first appearance. Missing files are dropped (or raise, ``strict``).
    """
    numbered = [(line, f, pid, cid, k) for k, (line, f, pid, cid) in enumerate(rows)]
    missing = [(line, f) for line, f, _, _ in rows if not f.is_file()]
    if missing:
        line, f = missing[0]
        message = (
            f"{path}:{line}: image file {f} not found; {len(missing)} missing file(s) "
            f"{'' if strict else 'skipped '}(paths are relative to the CSV's folder)"
        )
        if strict:
            raise DumpError(message)
        warnings.append(message)
        gone = {line for line, _ in missing}
        numbered = [r for r in numbered if r[0] not in gone]
    order: dict[tuple[bool, int | str], int] = {}
    product_ids: list[int | str] = []
    category_ids: list[int] = []
    first_line: list[int] = []
    owner = np.empty(len(numbered), dtype=np.int64)
    for j, (line, _, pid, cid, k) in enumerate(numbered):
        key = (pid is not None, pid if pid is not None else k)
        p = order.get(key)
        if p is None:
            p = order[key] = len(product_ids)
            product_ids.append(pid if pid is not None else k)
            category_ids.append(cid)
            first_line.append(line)
        elif category_ids[p] != cid:
            raise DumpError(
                f"{path}:{line}: product_id {pid!r} has category_id {cid} here but {category_ids[p]} at line "
                f"{first_line[p]}; give all images of a product the same category_id"
            )
        owner[j] = p
    grouped = np.argsort(owner, kind="stable")
    files = [numbered[j][1] for j in grouped]
    return files, owner, product_ids, category_ids


class CsvCatalogue(_FileCatalogue):
    """Image files listed in a CSV ``path,category_id[,product_id]`` (paths relative to the CSV).

    One row per image. Without a ``product_id`` column every image is a product of its own
    (its product_id is its row number, from 0); with one, rows sharing it form one product.
    An empty ``category_id`` means unlabelled (-1).

    Product ids that are not all integers are SKUs (e.g. ``train-101-0``): each product's
    ``_id`` is then its row number and ``skus`` holds its SKU (``None`` for a row without one);
    :func:`import_catalogue` keeps them as a ``sku`` field of each document.
    """

    def __init__(self, path: str | Path, *, strict: bool = False) -> None:
        path = Path(path)
        warnings: list[str] = []
        rows = self._read(path)
        files, owner, product_ids, category_ids = _group(path, rows, strict, warnings)
        super().__init__(path, files, owner, product_ids, category_ids, warnings)

    @staticmethod
    def _read(path: Path) -> list[tuple[int, Path, int | str | None, int]]:
        if not path.is_file():
            raise DumpError(f"{path}: catalogue not found; pass a CSV with columns path,category_id")
        base = path.parent
        rows = []
        try:
            with path.open(encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                header = [h.strip() for h in next(reader, [])]
                if "path" not in header:
                    raise DumpError(
                        f"{path}:1: no 'path' column (found {', '.join(header) or 'none'}); "
                        "the header must be path,category_id[,product_id]"
                    )
                col_path = header.index("path")
                col_cat = header.index("category_id") if "category_id" in header else None
                col_pid = header.index("product_id") if "product_id" in header else None
                for fields in reader:
                    line = reader.line_num
                    if not fields or all(not x.strip() for x in fields):
                        continue
                    if len(fields) < len(header):
                        raise DumpError(
                            f"{path}:{line}: {len(fields)} field(s) where the header has {len(header)}; "
                            "quote paths that contain commas"
                        )
                    cid = _int_field(path, line, "category_id", fields[col_cat]) if col_cat is not None else None
                    pid = (fields[col_pid].strip() or None) if col_pid is not None else None
                    rows.append((line, base / fields[col_path].strip(), pid, -1 if cid is None else cid))
        except UnicodeDecodeError as e:
            raise DumpError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        except csv.Error as e:
            raise DumpError(f"{path}: malformed CSV ({e}); fix the quoting of that line") from None
        pids = [pid for _, _, pid, _ in rows if pid is not None]
        if all(_is_int(pid) for pid in pids):
            rows = [(line, f, None if pid is None else int(pid), cid) for line, f, pid, cid in rows]
        return rows


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def _int_field(path: Path, line: int, name: str, value: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DumpError(f"{path}:{line}: {name} {value!r} is not an integer; fix that line") from None


class FolderCatalogue(_FileCatalogue):
    """One folder per category: ``ROOT/<category>/<image files>``; one product per image.

    A folder is named after its category_id, or (as torchvision's ImageFolder does) after the
    category's name: the taxonomy's level-3 name, when no other leaf has it. Products are
    ordered by category_id, then file name; a product's id is its row number. Files whose
    suffix is not an image suffix (see ``IMAGE_SUFFIXES``) are ignored.

    Args:
        path: the root folder.
        strict: raise on a missing file instead of skipping it.
        taxonomy: the taxonomy that maps folder names to category_ids (needed for names only).
    """

    def __init__(self, path: str | Path, *, strict: bool = False, taxonomy: Taxonomy | None = None) -> None:
        path = Path(path)
        if not path.is_dir():
            raise DumpError(f"{path}: folder not found; pass a folder with one sub-folder per category_id")
        rows = []
        folders = []
        for sub in sorted(path.iterdir()):
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            folders.append((_folder_category(path, sub, taxonomy), sub))
        for cid, sub in sorted(folders):
            for f in sorted(sub.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    rows.append((len(rows), f, None, cid))
        if not rows:
            raise DumpError(
                f"{path}: no images found; put the images of each category in a sub-folder named after its category_id"
            )
        files, owner, product_ids, category_ids = _group(path, rows, strict, [])
        super().__init__(path, files, owner, product_ids, category_ids, [])


def _folder_category(root: Path, sub: Path, taxonomy: Taxonomy | None) -> int:
    """The category_id a sub-folder stands for: its name as an integer, else the leaf of that level-3 name."""
    with contextlib.suppress(ValueError):
        return int(sub.name)
    if taxonomy is None:
        raise DumpError(
            f"{sub}: folder name {sub.name!r} is not a category_id; name each sub-folder of {root} after the "
            "integer category_id of its images, or pass --taxonomy to name them by category (level-3) name"
        )
    matches = [int(taxonomy.leaf_ids[i]) for i, name in enumerate(taxonomy.leaf_names) if name == sub.name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise DumpError(
            f"{sub}: {len(matches)} leaves of {taxonomy.source} are named {sub.name!r} (category_id "
            f"{', '.join(map(str, matches[:5]))}); rename the folder to the category_id it holds"
        )
    close = difflib.get_close_matches(sub.name, list(dict.fromkeys(taxonomy.leaf_names)), n=3)
    hint = f" (close: {', '.join(map(repr, close))})" if close else ""
    raise DumpError(
        f"{sub}: no leaf of {taxonomy.source} is named {sub.name!r}{hint}; name the folder after a level-3 "
        "name or a category_id of the taxonomy"
    )


# ---------------------------------------------------------------------- opening and writing
def open_source(
    path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    strict: bool = False,
    taxonomy: Taxonomy | None = None,
) -> ImageSource:
    """Open a dump (``.bson``), a CSV catalogue (``.csv``) or a folder catalogue (a directory).

    Args:
        path: the source.
        cache_dir: where to keep a dump's index file (default: beside the dump, else
            ``~/.cache/hierclass/index``).
        progress: show a progress bar while indexing a dump.
        strict: raise on any problem instead of skipping and reporting it.
        taxonomy: maps a folder catalogue's category names to category_ids (see :class:`FolderCatalogue`).

    Raises:
        DumpError: the source is missing, of an unknown kind, or (``strict``) damaged.
    """
    path = Path(path)
    if path.is_dir():
        return FolderCatalogue(path, strict=strict, taxonomy=taxonomy)
    suffix = path.suffix.lower()
    if suffix == ".bson":
        return BsonDump.open(path, cache_dir=cache_dir, progress=progress, strict=strict)
    if suffix == ".csv":
        return CsvCatalogue(path, strict=strict)
    if not path.exists():
        raise DumpError(f"{path}: not found; pass a .bson dump, a .csv catalogue or a folder of category folders")
    raise DumpError(f"{path}: unknown kind of source; pass a .bson dump, a .csv catalogue or a folder")


def _encode(product_id: int, category_id: int | None, jpegs: list[bytes], sku: str | None = None) -> bytes:
    # Field order as in Cdiscount's train.bson (_id, imgs, category_id), the reader's fast path; a sku goes last.
    doc: dict = {"_id": int(product_id), "imgs": [{"picture": bytes(j)} for j in jpegs]}
    if category_id is not None and category_id >= 0:
        doc["category_id"] = int(category_id)
    if sku is not None:
        doc["sku"] = str(sku)
    return bson.encode(doc)


def write_dump(path: str | Path, products: Iterable[tuple]) -> int:
    """Write products ``(_id, category_id or None, [JPEG bytes, ...][, sku])`` as a Cdiscount BSON dump.

    The file appears only when complete (written to a temporary file beside it, then
    renamed). A category_id of None or -1 is left out, as in Cdiscount's test dump; a sku
    (a string, or None for none) becomes the document's ``sku`` field.

    Returns:
        The number of products written.
    """
    count = 0
    with atomic_open(path, "wb", buffering=1 << 20) as f:
        for product in products:
            f.write(_encode(*product))
            count += 1
    return count


def source_skus(source: ImageSource) -> list[str | None] | None:
    """The SKU of each product row of a source, or None when it has none.

    A CSV catalogue has them when its product ids are SKUs; a dump when its documents carry
    a ``sku`` field (as :func:`import_catalogue` writes): the first document decides, and
    only then are the others read.
    """
    if not isinstance(source, BsonDump):
        return getattr(source, "skus", None)
    if len(source) == 0 or "sku" not in source.read_document(0):
        return None
    return [source.read_document(p).get("sku") for p in range(len(source))]


def products_of(source: ImageSource, rows: Iterable[int]) -> Iterator[tuple[int, int, list[bytes]]]:
    """The products at ``rows`` of a source as ``(_id, category_id, [JPEG bytes])``, for :func:`write_dump`."""
    for p in rows:
        yield int(source.product_ids[p]), int(source.category_ids[p]), source.read_images(int(p))


def as_jpeg(data: bytes, quality: int = 95) -> bytes | None:
    """``data`` itself if it is a JPEG, else the image re-encoded as JPEG; None if undecodable."""
    if data[:3] == b"\xff\xd8\xff":
        return data
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            out = io.BytesIO()
            im.convert("RGB").save(out, format="JPEG", quality=quality)
            return out.getvalue()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _import_products(
    source: ImageSource, counts: dict[str, int]
) -> Iterator[tuple[int, int | None, list[bytes], str | None]]:
    skus = source_skus(source)
    for p in range(len(source)):
        jpegs = []
        for data in source.read_images(p):
            jpeg = as_jpeg(data)
            if jpeg is None:
                counts["bad_images"] += 1
            else:
                jpegs.append(jpeg)
        if not jpegs:
            counts["skipped_products"] += 1
            continue
        cid = int(source.category_ids[p])
        yield int(source.product_ids[p]), (cid if cid >= 0 else None), jpegs, (skus[p] if skus else None)


def import_catalogue(
    source: str | Path | ImageSource,
    out: str | Path,
    *,
    progress: bool = True,
    taxonomy: Taxonomy | None = None,
) -> dict[str, int]:
    """Write a catalogue (CSV, folder or another dump) as a Cdiscount BSON dump.

    JPEG files are copied byte for byte; other image formats are re-encoded as JPEG
    (quality 95); undecodable files are skipped and counted, and so are products left with
    no image. SKUs (see :class:`CsvCatalogue`) go to each document's ``sku`` field.
    ``taxonomy`` maps a folder catalogue's category names to category_ids.

    Returns:
        Counts: ``products`` written, ``images`` written, ``bad_images``, ``skipped_products``.
    """
    from tqdm import tqdm

    src = source if isinstance(source, ImageSource) else open_source(source, progress=progress, taxonomy=taxonomy)
    counts = {"products": 0, "images": 0, "bad_images": 0, "skipped_products": 0}
    products = tqdm(_import_products(src, counts), total=len(src), unit="product", disable=not progress, leave=False)

    def counted() -> Iterator[tuple[int, int | None, list[bytes], str | None]]:
        for product in products:
            counts["images"] += len(product[2])
            yield product

    counts["products"] = write_dump(out, counted())
    return counts
