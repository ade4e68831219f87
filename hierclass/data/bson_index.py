"""The offset index of a Cdiscount BSON dump: one sequential pass, pictures never copied.

A dump is a file of concatenated BSON documents
``{_id: int, category_id: int, imgs: [{picture: <JPEG bytes>}, ...]}`` (test dumps have no
``category_id``). :func:`scan_dump` walks it once, reading each document's 4-byte length
prefix and the headers of its elements, and skips the picture payloads by their length, so
the work is per document, not per byte. The file is memory-mapped: the kernel reads ahead
and the picture bytes are never copied into Python.

The result, a :class:`BsonIndex` (offset, length, product_id, category_id, n_images per
product), is saved as ``<dump>.idx.npz`` beside the dump (or in a cache directory when the
dump's folder is read-only or a directory is given) and reused while the dump's size and
mtime are unchanged.

Bad input loses nothing silently. A document whose frame is broken (length prefix below the
BSON minimum of 5 bytes, running past the end of the file, missing its final 0 byte) stops
the pass: every good product before it is kept and the report says where and how many
bytes were not indexed. A well-framed document without images, or with malformed fields,
is skipped and counted. ``strict=True`` raises :class:`~hierclass.errors.DumpError` instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import tempfile
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hierclass.errors import DumpError

INDEX_VERSION = 1
"""Bumped whenever the index file layout or the scanner's rules change; old files are rebuilt."""

MIN_DOC = 5
"""The smallest BSON document: a 4-byte length and the final 0 byte."""

_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_ID, _CAT, _IMGS = b"\x10_id\x00", b"\x10category_id\x00", b"\x04imgs\x00"
_PICTURE = b"\x05picture\x00"

# Byte size of BSON values whose size does not depend on their content, by type byte.
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16, 0x7F: 0, 0xFF: 0}
_TYPE_NAMES = {0x01: "double", 0x02: "string", 0x03: "document", 0x04: "array", 0x05: "binary", 0x08: "bool"}


class _Malformed(Exception):
    """A well-framed document whose content is not a product; it is skipped and counted."""


@dataclass
class IndexReport:
    """What one pass over a dump found (also stored in the index file and shown on reuse).

    Attributes:
        path: the dump.
        size_bytes: the dump's size.
        n_products: products indexed (documents with at least one image).
        n_images: images over the indexed products.
        images_per_product: ``{n_images: n_products}``.
        n_categories: distinct category_ids among the indexed products (-1 not counted).
        n_without_category: indexed products without a category_id (a test dump).
        indexed_bytes: bytes of whole documents read before the pass stopped (or the whole file).
        unindexed_bytes: bytes after the point where the pass stopped (0 for a sound dump).
        stop_offset: byte offset of the document that stopped the pass, or None.
        stop_reason: what was found there, or None.
        n_no_images: well-framed documents skipped because they have no ``imgs`` or zero images.
        first_no_images_offset: byte offset of the first of them.
        n_malformed: well-framed documents skipped because a field is malformed.
        first_malformed_offset: byte offset of the first of them.
        first_malformed_reason: what was wrong with it.
        reused: True when the index was loaded from an index file rather than built.
        index_file: where the index was saved or loaded from (None if it could not be saved).
    """

    path: str
    size_bytes: int
    n_products: int = 0
    n_images: int = 0
    images_per_product: dict[int, int] = field(default_factory=dict)
    n_categories: int = 0
    n_without_category: int = 0
    indexed_bytes: int = 0
    unindexed_bytes: int = 0
    stop_offset: int | None = None
    stop_reason: str | None = None
    n_no_images: int = 0
    first_no_images_offset: int | None = None
    n_malformed: int = 0
    first_malformed_offset: int | None = None
    first_malformed_reason: str | None = None
    reused: bool = False
    index_file: str | None = None

    @property
    def ok(self) -> bool:
        """True when every byte was indexed and no document was skipped."""
        return self.stop_offset is None and self.n_no_images == 0 and self.n_malformed == 0

    def problems(self) -> list[str]:
        """One line per kind of problem, each naming the file, the byte offset and the fix."""
        lines = []
        if self.stop_offset is not None:
            lines.append(
                f"{self.path}:{self.stop_offset}: {self.stop_reason}; indexing stopped there, "
                f"{self.unindexed_bytes} byte(s) not indexed ({self.n_products} good products before it kept); "
                "re-download or re-copy the dump"
            )
        if self.n_malformed:
            lines.append(
                f"{self.path}:{self.first_malformed_offset}: {self.first_malformed_reason}; "
                f"{self.n_malformed} malformed document(s) skipped; fix or re-export them"
            )
        if self.n_no_images:
            lines.append(
                f"{self.path}:{self.first_no_images_offset}: document without images; "
                f"{self.n_no_images} such document(s) skipped (they cannot be classified)"
            )
        return lines


@dataclass
class BsonIndex:
    """Per-product arrays of a dump (int64, one row per indexed product, in file order).

    Attributes:
        offset: byte offset of the product's document.
        length: byte length of the document.
        product_id: the ``_id``.
        category_id: the ``category_id``, -1 when the document has none.
        n_images: the number of pictures.
        report: what the pass found.
    """

    offset: np.ndarray
    length: np.ndarray
    product_id: np.ndarray
    category_id: np.ndarray
    n_images: np.ndarray
    report: IndexReport

    def __len__(self) -> int:
        return len(self.offset)


# ---------------------------------------------------------------------- scanning
def _value_size(mm: mmap.mmap, t: int, v: int, end: int) -> int:
    """The byte size of a BSON value of type ``t`` starting at ``v``."""
    size = _FIXED.get(t)
    if size is not None:
        return size
    if t in (0x02, 0x0D, 0x0E):  # string, JavaScript code, symbol: int32 length + bytes
        return 4 + _I32.unpack_from(mm, v)[0]
    if t in (0x03, 0x04, 0x0F):  # document, array, code with scope: int32 total length
        return _I32.unpack_from(mm, v)[0]
    if t == 0x05:  # binary: int32 length, subtype byte, bytes
        return 5 + _I32.unpack_from(mm, v)[0]
    if t == 0x0B:  # regex: two C strings
        a = mm.find(b"\x00", v, end)
        b = mm.find(b"\x00", a + 1, end) if a >= 0 else -1
        if b < 0:
            raise _Malformed(f"unterminated regex at byte {v}")
        return b + 1 - v
    if t == 0x0C:  # DBPointer: string + 12-byte ObjectId
        return 16 + _I32.unpack_from(mm, v)[0]
    raise _Malformed(f"unknown BSON element type 0x{t:02x} at byte {v}")


def _elements(mm: mmap.mmap, start: int, end: int):
    """Yield ``(type, name, value_start, value_size)`` of the document ``mm[start:end]``."""
    pos = start + 4
    last = end - 1
    while pos < last:
        t = mm[pos]
        ne = mm.find(b"\x00", pos + 1, last)
        if ne < 0:
            raise _Malformed(f"unterminated field name at byte {pos}")
        v = ne + 1
        if v + 4 > end and t not in _FIXED:
            raise _Malformed(f"field {mm[pos + 1 : ne]!r} runs past its document")
        size = _value_size(mm, t, v, end)
        if size < 0 or v + size > last:
            raise _Malformed(f"field {mm[pos + 1 : ne]!r} of {size} bytes runs past its document")
        yield t, mm[pos + 1 : ne], v, size
        pos = v + size
    if pos != last:
        raise _Malformed("fields overrun the document's end")


def _count_images(mm: mmap.mmap, start: int, end: int) -> int:
    """The number of ``{picture: <binary>}`` entries of the ``imgs`` array ``mm[start:end]``."""
    n = 0
    for t, _, v, size in _elements(mm, start, end):
        if t != 0x03:
            raise _Malformed(f"imgs[{n}] is a {_TYPE_NAMES.get(t, f'type 0x{t:02x}')}, not a document")
        if size < MIN_DOC or _I32.unpack_from(mm, v)[0] != size or mm[v + size - 1] != 0:
            raise _Malformed(f"imgs[{n}] has a bad length")
        if mm[v + 4 : v + 13] != _PICTURE and not any(
            t2 == 0x05 and name == b"picture" for t2, name, _, _ in _elements(mm, v, v + size)
        ):
            raise _Malformed(f"imgs[{n}] has no binary 'picture' field")
        n += 1
    return n


def _integer(mm: mmap.mmap, t: int, v: int, name: str) -> int:
    if t == 0x10:
        return _I32.unpack_from(mm, v)[0]
    if t == 0x12:
        return _I64.unpack_from(mm, v)[0]
    raise _Malformed(f"{name} is a {_TYPE_NAMES.get(t, f'type 0x{t:02x}')}, not an integer")


def _parse_generic(mm: mmap.mmap, off: int, end: int) -> tuple[int | None, int, int]:
    """``(product_id, category_id, n_images)`` of any well-framed document, field order free."""
    pid: int | None = None
    cid = -1
    n = 0
    for t, name, v, size in _elements(mm, off, end):
        if name == b"_id":
            pid = _integer(mm, t, v, "_id")
        elif name == b"category_id":
            cid = _integer(mm, t, v, "category_id")
        elif name == b"imgs":
            if t != 0x04:
                raise _Malformed(f"imgs is a {_TYPE_NAMES.get(t, f'type 0x{t:02x}')}, not an array")
            n = _count_images(mm, v, v + size)
    return pid, cid, n


# ---------------------------------------------------------------------- vectorised parsing
_WINDOW = 1 << 26  # bytes of documents framed, then parsed with numpy, per step


def _at(u8: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return u8[np.clip(idx, 0, len(u8) - 1)].astype(np.int64)  # garbage lengths point anywhere


def _i32_at(u8: np.ndarray, idx: np.ndarray) -> np.ndarray:
    v = _at(u8, idx) | (_at(u8, idx + 1) << 8) | (_at(u8, idx + 2) << 16) | (_at(u8, idx + 3) << 24)
    return np.where(v >= 1 << 31, v - (1 << 32), v)


def _matches(u8: np.ndarray, idx: np.ndarray, pattern: bytes) -> np.ndarray:
    ok = np.ones(len(idx), dtype=bool)
    for k, byte in enumerate(pattern):
        ok &= _at(u8, idx + k) == byte
    return ok


def _parse_regular(u8: np.ndarray, o: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parse, with numpy, the well-framed documents ``u8[o:end]`` that are laid out regularly.

    Regular means as Cdiscount writes them (``_id, imgs[, category_id]``) or with
    ``_id, category_id, imgs``, int32 ids and 1 to 10 ``{picture: <binary>}`` images.

    Returns:
        ``(rows [n, 5] int64: offset, length, product_id, category_id, n_images; ok [n])``;
        the rows where ``ok`` is False are left to the per-document walker.
    """
    ok = (end - o >= 42) & _matches(u8, o + 4, _ID)
    pid = _i32_at(u8, o + 9)
    # Layout A (Cdiscount): _id, imgs, then category_id or nothing.
    is_a = _matches(u8, o + 13, _IMGS)
    a_end_a = o + 19 + _i32_at(u8, o + 19)
    with_cat = (end - a_end_a == 18) & _matches(u8, a_end_a, _CAT)
    ok_a = is_a & (with_cat | (end - a_end_a == 1))
    # Layout B: _id, category_id, imgs.
    a_end_b = o + 36 + _i32_at(u8, o + 36)
    ok_b = ~is_a & _matches(u8, o + 13, _CAT) & _matches(u8, o + 30, _IMGS) & (a_end_b == end - 1)
    ok &= ok_a | ok_b
    a = np.where(is_a, o + 19, o + 36)
    a_end = np.where(is_a, a_end_a, a_end_b)
    cid = np.where(is_a, np.where(with_cat, _i32_at(u8, a_end_a + 13), -1), _i32_at(u8, o + 26))
    ok &= (a_end - a > 5) & (a_end < end)
    # Walk the images of every document at once, one image number per step.
    p = a + 4
    n = np.zeros(len(o), np.int64)
    active = ok.copy()
    for j in range(10):
        active &= p < a_end - 1
        if not active.any():
            break
        sub = _i32_at(u8, p + 3)
        good = (_at(u8, p) == 3) & (_at(u8, p + 1) == 48 + j) & (_at(u8, p + 2) == 0) & (sub >= 19)
        good &= _matches(u8, p + 7, _PICTURE)
        ok &= ~active | good
        active &= good
        p = np.where(active, p + 3 + sub, p)
        n += active
    ok &= (p == a_end - 1) & (_at(u8, a_end - 1) == 0) & (n >= 1)
    return np.stack([o, end - o, pid, cid, n], axis=1), ok


def scan_dump(path: str | Path, *, progress: bool = True) -> BsonIndex:
    """Index a dump in one sequential pass (never raises for bad content; see the report).

    Args:
        path: the ``.bson`` dump.
        progress: show a tqdm progress bar (bytes) on stderr.

    Returns:
        The index; ``index.report`` says what was skipped and where the pass stopped.

    Raises:
        DumpError: the file is missing or unreadable.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise DumpError(f"{path}: cannot open the dump ({e.strerror}); check the path") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return _finish(path, size, np.zeros((0, 5), np.int64), 0, None, None, Counter(), [None, None])
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        with tqdm(total=size, unit="B", unit_scale=True, desc=path.name, disable=not progress, leave=False) as bar:
            return _scan(path, mm, size, bar)
    finally:
        with contextlib.suppress(BufferError):  # an exception's traceback may still hold a view
            mm.close()


def _scan(path: Path, mm: mmap.mmap, size: int, bar: tqdm) -> BsonIndex:
    i32 = _I32.unpack_from
    u8 = np.frombuffer(mm, dtype=np.uint8)
    chunks: list[np.ndarray] = []
    skipped: Counter[str] = Counter()
    firsts: list = [None, None]  # first no-images offset, (first malformed offset, reason)
    off = 0
    stop_reason = None
    while off < size and stop_reason is None:
        # 1. Frame a window of documents by their length prefixes (the only serial part).
        starts = array("q")
        append = starts.append
        limit = min(off + _WINDOW, size)
        while off < limit:
            left = size - off
            if left < 4:
                stop_reason = f"truncated document: {left} byte(s) left, fewer than a 4-byte length prefix"
                break
            (n_bytes,) = i32(mm, off)
            if n_bytes < MIN_DOC:
                stop_reason = f"length prefix {n_bytes} is below the BSON minimum of {MIN_DOC}"
                break
            if n_bytes > left:
                stop_reason = (
                    f"truncated document: its length prefix says {n_bytes} bytes but only {left} remain in the file"
                )
                break
            append(off)
            off += n_bytes
        o = np.frombuffer(starts, dtype=np.int64).copy() if len(starts) else np.zeros(0, np.int64)
        end = np.append(o[1:], off)
        # 2. A document must end with a 0 byte; the first that does not stops the pass there.
        unterminated = np.flatnonzero(_at(u8, end - 1) != 0)
        if len(unterminated):
            bad = int(unterminated[0])
            stop_reason = f"document of {int(end[bad] - o[bad])} bytes does not end with a 0 byte (bad length prefix)"
            o, end, off = o[:bad], end[:bad], int(o[bad])
        # 3. Parse the regular documents with numpy, the others one by one.
        rows, ok = _parse_regular(u8, o, end)
        for i in np.flatnonzero(~ok):
            doc_off, doc_end = int(o[i]), int(end[i])
            try:
                pid, cid, n = _parse_generic(mm, doc_off, doc_end)
                if pid is None:
                    raise _Malformed("no _id field")
            except (_Malformed, struct.error, IndexError) as e:
                skipped["malformed"] += 1
                if firsts[1] is None:
                    firsts[1] = (doc_off, f"malformed document ({e})")
                continue
            if n == 0:
                skipped["no_images"] += 1
                if firsts[0] is None:
                    firsts[0] = doc_off
                continue
            rows[i, 2:] = (pid, cid, n)
            ok[i] = True
        chunks.append(rows[ok])
        bar.update(off - bar.n)
    del u8  # release the buffer before the mmap closes
    table = np.concatenate(chunks) if chunks else np.zeros((0, 5), np.int64)
    return _finish(path, size, table, off, stop_reason, off if stop_reason else None, skipped, firsts)


def _finish(
    path: Path,
    size: int,
    table: np.ndarray,
    indexed: int,
    stop_reason: str | None,
    stop_offset: int | None,
    skipped: Counter,
    firsts: list,
) -> BsonIndex:
    table = table if len(table) else np.zeros((0, 5), np.int64)
    cols = [np.ascontiguousarray(table[:, k]) for k in range(5)]
    report = IndexReport(
        path=str(path),
        size_bytes=size,
        indexed_bytes=indexed,
        unindexed_bytes=size - indexed,
        stop_offset=stop_offset,
        stop_reason=stop_reason,
        n_no_images=skipped["no_images"],
        first_no_images_offset=firsts[0],
        n_malformed=skipped["malformed"],
        first_malformed_offset=firsts[1][0] if firsts[1] else None,
        first_malformed_reason=firsts[1][1] if firsts[1] else None,
    )
    index = BsonIndex(*cols, report=report)
    _summarise(index)
    return index


def _summarise(index: BsonIndex) -> None:
    r = index.report
    r.n_products = len(index)
    r.n_images = int(index.n_images.sum())
    counts = np.bincount(index.n_images) if len(index) else np.zeros(0, np.int64)
    r.images_per_product = {int(k): int(c) for k, c in enumerate(counts) if c}
    labelled = index.category_id[index.category_id >= 0]
    r.n_categories = len(np.unique(labelled))
    r.n_without_category = int(len(index) - len(labelled))


# ---------------------------------------------------------------------- the index file
def default_cache_dir() -> Path:
    """Where index files go when the dump's folder is read-only: ``$HIERCLASS_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/hierclass/index``, else ``~/.cache/hierclass/index``."""
    env = os.environ.get("HIERCLASS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hierclass" / "index"


def index_paths(dump: str | Path, cache_dir: str | Path | None = None) -> list[Path]:
    """The index files to try for a dump, in order: the given cache directory only, else
    ``<dump>.idx.npz`` beside it, then the default cache directory."""
    dump = Path(dump)
    tag = hashlib.sha1(str(dump.resolve()).encode()).hexdigest()[:12]
    cached = f"{dump.name}.{tag}.idx.npz"
    if cache_dir is not None:
        return [Path(cache_dir) / cached]
    return [dump.with_name(dump.name + ".idx.npz"), default_cache_dir() / cached]


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def load_index(dump: str | Path, index_file: str | Path) -> BsonIndex | None:
    """The index in ``index_file`` if it was made from ``dump`` as it is now (same size and
    mtime, same index version); else None."""
    index_file = Path(index_file)
    try:
        with np.load(index_file, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("version") != INDEX_VERSION or tuple(meta.get("stamp", ())) != _stamp(Path(dump)):
                return None
            cols = [z[k].astype(np.int64, copy=False) for k in ("offset", "length", "product_id", "category_id")]
            cols.append(z["n_images"].astype(np.int64))
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # absent, stale or damaged: rebuild
    report = IndexReport(**meta["report"])
    report.path = str(dump)
    report.images_per_product = {int(k): v for k, v in report.images_per_product.items()}
    report.reused = True
    report.index_file = str(index_file)
    return BsonIndex(*cols, report=report)


def save_index(index: BsonIndex, dump: str | Path, index_file: str | Path, stamp: tuple[int, int]) -> None:
    """Write the index atomically (temporary file in the same folder, then rename).

    Raises:
        OSError: the folder is not writable.
    """
    index_file = Path(index_file)
    index_file.parent.mkdir(parents=True, exist_ok=True)
    report = asdict(index.report)
    report.pop("reused"), report.pop("index_file")
    meta = {"version": INDEX_VERSION, "stamp": list(stamp), "dump": str(dump), "report": report}
    fd, tmp = tempfile.mkstemp(prefix=index_file.name + ".", suffix=".tmp", dir=index_file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                meta=np.array(json.dumps(meta)),
                offset=index.offset,
                length=index.length.astype(np.int32),  # documents are < 2 GiB by the BSON spec
                product_id=index.product_id,
                category_id=index.category_id,
                n_images=index.n_images.astype(np.int16),
            )
        os.replace(tmp, index_file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def build_index(
    dump: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    strict: bool = False,
    rebuild: bool = False,
) -> BsonIndex:
    """The index of a dump: reused from its index file if still valid, else built and saved.

    Args:
        dump: the ``.bson`` dump.
        cache_dir: keep the index file here instead of beside the dump.
        progress: show a progress bar while building.
        strict: raise on any problem instead of reporting it.
        rebuild: ignore an existing index file.

    Raises:
        DumpError: the dump is missing; or, with ``strict``, it is truncated or has skipped
            documents (the message names the file, the byte offset and what was found).
    """
    dump = Path(dump)
    if not dump.is_file():
        raise DumpError(f"{dump}: dump not found; pass the path of a .bson file")
    candidates = index_paths(dump, cache_dir)
    index = None
    if not rebuild:
        for candidate in candidates:
            index = load_index(dump, candidate)
            if index is not None:
                break
    if index is None:
        stamp = _stamp(dump)
        index = scan_dump(dump, progress=progress)
        if _stamp(dump) == stamp:  # never cache an index of a file that changed while being read
            for candidate in candidates:
                try:
                    save_index(index, dump, candidate, stamp)
                except OSError:
                    continue
                index.report.index_file = str(candidate)
                break
    if strict and not index.report.ok:
        raise DumpError(index.report.problems()[0])
    return index
