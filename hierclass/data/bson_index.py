"""The offset index of a Cdiscount BSON dump: one sequential pass, pictures never copied.

A dump is a file of concatenated BSON documents
``{_id: int, category_id: int, imgs: [{picture: <JPEG bytes>}, ...]}`` (test dumps have no
``category_id``). :func:`scan_dump` walks it once, reading each document's 4-byte length
prefix and the headers of its elements, and skips the picture payloads by their length, so
the work is per document, not per byte. The file is read through one read-only memory map, no
copy of the bytes at all, in windows of 32 MiB: before the compiled loop scans a window, the
window behind is unmapped and this one mapped in (its page-table entries) when its pages are in
the page cache, so the process never maps more than a few windows of a 58 GB dump. On a cold
file the scan's own faults read the disk, with the kernel's sequential read-ahead. From a
warm page cache the pass runs at 0.65-2.3x the speed of a plain sequential read of the file,
the slowest on small (2.4 KB) documents; from the disk, at the disk's pace
(``benchmarks/bench_data.py``, figures in ``benchmarks/README.md``). The loop is compiled with
numba (cached on disk after the first use); a Python loop managed ~0.5 GB/s.

The result, a :class:`BsonIndex` (offset, length, product_id, category_id, n_images per
product), is saved as ``<dump>.idx.npz`` beside the dump (or in a cache directory when the
dump's folder is read-only or a directory is given) and reused while the dump's size and
mtime are unchanged.

Bad input loses nothing silently. A document whose frame is broken (length prefix below the
BSON minimum of 5 bytes, running past the end of the file, missing its final 0 byte) is
skipped: the pass scans forward, byte by byte, for the next offset where a whole, well-formed
product document starts and resumes there, so the good documents after a damaged one are
recovered. The report says where the first damage is, how many bytes were skipped and how
many products were recovered after it; when no good document follows, the pass stops there.
A well-framed document without images, or with malformed fields,
is skipped and counted. ``_id`` and ``category_id`` may be int32, int64 or a double holding
an integer (some exporters write those). ``strict=True`` raises :class:`~hierclass.errors.DumpError` instead.
A dump that shrinks during the pass is caught before each window (a ``DumpError``); one cut
while its window is being read kills the process with SIGBUS, as with any memory map. Nothing
is written before the pass ends, so nothing is corrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import mmap
import os
import struct
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numba import njit
from tqdm import tqdm

from hierclass.atomic import atomic_open
from hierclass.errors import DumpError

INDEX_VERSION = 3
"""Bumped whenever the index file layout or the scanner's rules change; old files are rebuilt."""

MIN_DOC = 5
"""The smallest BSON document: a 4-byte length and the final 0 byte."""

_F64 = struct.Struct("<d")

_TYPE_NAMES = {0x01: "double", 0x02: "string", 0x03: "document", 0x04: "array", 0x05: "binary", 0x08: "bool"}


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
        indexed_bytes: bytes of whole documents read (the whole file for a sound dump).
        unindexed_bytes: bytes skipped over broken frames, up to the end of the file when nothing
            good followed the last one (0 for a sound dump).
        stop_offset: byte offset of the first broken frame, or None.
        stop_reason: what was found there, or None.
        n_damaged: broken frames found (each skipped up to the next good document).
        resume_offset: where the pass resumed after the first broken frame (None: it did not).
        n_recovered: products indexed after the first broken frame.
        n_no_images: well-framed documents skipped because they have no ``imgs`` or zero images.
        first_no_images_offset: byte offset of the first of them.
        n_malformed: well-framed documents skipped because a field is malformed.
        first_malformed_offset: byte offset of the first of them.
        first_malformed_reason: what was wrong with it.
        n_duplicate_ids: products whose ``_id`` an earlier product of the dump has already.
        first_duplicate_offset: byte offset of the first of them.
        first_duplicate_id: its ``_id``.
        index_warning: why an existing index file was not used and the index was built again (a
            damaged file, or one that does not match the dump), or None.
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
    n_damaged: int = 0
    resume_offset: int | None = None
    n_recovered: int = 0
    n_no_images: int = 0
    first_no_images_offset: int | None = None
    n_malformed: int = 0
    first_malformed_offset: int | None = None
    first_malformed_reason: str | None = None
    n_duplicate_ids: int = 0
    first_duplicate_offset: int | None = None
    first_duplicate_id: int | None = None
    index_warning: str | None = None
    reused: bool = False
    index_file: str | None = None

    @property
    def ok(self) -> bool:
        """True when every byte was indexed and no document was skipped."""
        return self.stop_offset is None and self.n_no_images == 0 and self.n_malformed == 0 and not self.n_duplicate_ids

    def problems(self) -> list[str]:
        """One line per kind of problem, each naming the file, the byte offset and the fix."""
        lines = []
        if self.stop_offset is not None and self.resume_offset is None:
            lines.append(
                f"{self.path}:{self.stop_offset}: {self.stop_reason}; indexing stopped there, "
                f"{self.unindexed_bytes} byte(s) not indexed ({self.n_products} good products before it kept); "
                "re-download or re-copy the dump"
            )
        elif self.stop_offset is not None:
            lines.append(
                f"{self.path}:{self.stop_offset}: {self.stop_reason}; {self.n_damaged} damaged place(s), "
                f"{self.unindexed_bytes} byte(s) not indexed (the products there are lost), indexing resumed at "
                f"byte {self.resume_offset} and recovered {self.n_recovered} good product(s) after it; "
                "re-download or re-copy the dump"
            )
        if self.n_malformed:
            lines.append(
                f"{self.path}:{self.first_malformed_offset}: {self.first_malformed_reason}; "
                f"{self.n_malformed} malformed document(s) skipped; fix or re-export them"
            )
        if self.n_duplicate_ids:
            lines.append(
                f"{self.path}:{self.first_duplicate_offset}: _id {self.first_duplicate_id} appears again; "
                f"{self.n_duplicate_ids} product(s) repeat an earlier _id (a submission needs one row per _id); "
                "give each product its own _id"
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
# The pass is one compiled loop (numba) over a read-only map of the whole file: follow the length
# prefixes from document to document, walk each document's element headers, skip values by
# their length. It reports what it found as small integer codes; Python turns the first bad
# frame and the first malformed document into messages (:func:`_stop_reason`, :func:`_malformed_reason`).
# Before the loop scans a window of the map, the window behind is unmapped and this one mapped in
# when its pages are in the page cache (:class:`_FileMap`). Doing that in a helper thread while the
# previous window was scanned saved 7% of `hierclass index` on a warm 1 GB dump and nothing on a
# cold one (``benchmarks/README.md``, "End to end"): not worth a thread.
_ROWS = 1 << 16  # products per call of the compiled loop, at most
_WINDOW = 32 << 20  # the scan's step, and the bytes mapped in at a time
_FIRST_WINDOW = 1 << 20  # the first step, short: mapped in by the scan's own faults

# Why the pass stopped (a broken frame), with one value: what the length prefix said, or the bytes left.
_STOP_NONE, _STOP_STUB, _STOP_BELOW_MIN, _STOP_PAST_EOF, _STOP_NO_FINAL_ZERO = 0, 1, 2, 3, 4

# What a well-framed document is, with up to three values (a, b, c) locating the problem.
_DOC_OK = 0
_DOC_NO_IMAGES = 1
_BAD_NO_ID = 2  # -
_BAD_NOT_INTEGER = 3  # a: 0 _id / 1 category_id, b: type
_BAD_FRACTIONAL = 4  # a: 0 _id / 1 category_id, b: byte offset of the double
_BAD_IMGS_NOT_ARRAY = 5  # b: type
_BAD_IMAGE_NOT_DOCUMENT = 6  # a: image number, b: type
_BAD_IMAGE_LENGTH = 7  # a: image number
_BAD_IMAGE_NO_PICTURE = 8  # a: image number
_BAD_UNKNOWN_TYPE = 9  # a: byte offset of the value, b: type
_BAD_UNTERMINATED_NAME = 10  # a: byte offset of the element
_BAD_FIELD_PAST_END = 11  # a, b: the field name's bytes [a, b), c: the value's size (-1: not even its length fits)
_BAD_UNTERMINATED_REGEX = 12  # a: byte offset of the value
_BAD_OVERRUN = 13  # -

_NAME_ID = np.frombuffer(b"_id", np.uint8)
_NAME_CATEGORY = np.frombuffer(b"category_id", np.uint8)
_NAME_IMGS = np.frombuffer(b"imgs", np.uint8)
_NAME_PICTURE = np.frombuffer(b"picture", np.uint8)
_PICTURE_HEADER = np.frombuffer(b"\x05picture\x00", np.uint8)


@njit(cache=True, nogil=True, inline="always")
def _i32(u8: np.ndarray, p: int) -> int:
    v = np.int64(u8[p]) | (np.int64(u8[p + 1]) << 8) | (np.int64(u8[p + 2]) << 16) | (np.int64(u8[p + 3]) << 24)
    return v - (np.int64(1) << 32) if v >= (np.int64(1) << 31) else v


@njit(cache=True, nogil=True, inline="always")
def _u64(u8: np.ndarray, p: int) -> np.uint64:
    bits = np.uint64(0)
    for k in range(8):
        bits |= np.uint64(u8[p + k]) << np.uint64(8 * k)
    return bits


@njit(cache=True, nogil=True, inline="always")
def _same(u8: np.ndarray, start: int, stop: int, name: np.ndarray) -> bool:
    if stop - start != len(name):
        return False
    for k in range(len(name)):  # noqa: SIM110 (numba compiles loops, not generators)
        if u8[start + k] != name[k]:
            return False
    return True


@njit(cache=True, nogil=True)
def _fixed_size(t: int) -> int:
    """The byte size of BSON values whose size does not depend on their content; -1 for the others."""
    if t == 0x01 or t == 0x09 or t == 0x11 or t == 0x12:  # double, datetime, timestamp, int64
        return 8
    if t == 0x07:  # ObjectId
        return 12
    if t == 0x08:  # bool
        return 1
    if t == 0x10:  # int32
        return 4
    if t == 0x13:  # decimal128
        return 16
    if t == 0x0A or t == 0x7F or t == 0xFF:  # null, max key, min key
        return 0
    return -1


@njit(cache=True, nogil=True, inline="always")
def _name_end(u8: np.ndarray, pos: int, last: int) -> int:
    """Where the field name starting at ``pos`` ends (its 0 byte), or ``last`` if it runs that far."""
    while pos < last and u8[pos] != 0:
        pos += 1
    return pos


@njit(cache=True, nogil=True)
def _element(u8: np.ndarray, pos: int, end: int) -> tuple[int, int, int, int, int, int, int, int]:
    """The element at ``pos`` of the document ending at ``end``:
    ``(type, name_end, value_start, value_size, error, a, b, c)``; ``error`` is 0 or a ``_BAD_*`` code."""
    last = end - 1
    t = np.int64(u8[pos])
    ne = _name_end(u8, pos + 1, last)
    if ne >= last:
        return t, ne, 0, 0, _BAD_UNTERMINATED_NAME, pos, 0, 0
    v = ne + 1
    size = _fixed_size(t)
    if size < 0:
        if v + 4 > end:
            return t, ne, v, 0, _BAD_FIELD_PAST_END, pos + 1, ne, -1
        if t == 0x02 or t == 0x0D or t == 0x0E:  # string, JavaScript code, symbol: int32 length + bytes
            size = 4 + _i32(u8, v)
        elif t == 0x03 or t == 0x04 or t == 0x0F:  # document, array, code with scope: int32 total length
            size = _i32(u8, v)
        elif t == 0x05:  # binary: int32 length, subtype byte, bytes
            size = 5 + _i32(u8, v)
        elif t == 0x0B:  # regex: two C strings
            a = v
            while a < end and u8[a] != 0:
                a += 1
            b = a + 1
            while b < end and u8[b] != 0:
                b += 1
            if a >= end or b >= end:
                return t, ne, v, 0, _BAD_UNTERMINATED_REGEX, v, 0, 0
            size = b + 1 - v
        elif t == 0x0C:  # DBPointer: string + 12-byte ObjectId
            size = 16 + _i32(u8, v)
        else:
            return t, ne, v, 0, _BAD_UNKNOWN_TYPE, v, t, 0
    if size < 0 or v + size > last:
        return t, ne, v, size, _BAD_FIELD_PAST_END, pos + 1, ne, size
    return t, ne, v, size, 0, 0, 0, 0


@njit(cache=True, nogil=True)
def _integer(u8: np.ndarray, t: int, v: int) -> tuple[int, int]:
    """``(0, value)`` of an int32, int64 or integral double; else ``(_BAD_*, b)``."""
    if t == 0x10:
        return 0, _i32(u8, v)
    if t == 0x12:
        return 0, np.int64(_u64(u8, v))
    if t == 0x01:  # some exporters write ids as doubles; take them when they hold an integer
        x = np.array([_u64(u8, v)]).view(np.float64)[0]
        if x == np.floor(x) and abs(x) < 2.0**53:
            return 0, np.int64(x)
        return _BAD_FRACTIONAL, v
    return _BAD_NOT_INTEGER, t


@njit(cache=True, nogil=True)
def _has_picture(u8: np.ndarray, start: int, end: int) -> tuple[int, int, int, int, int]:
    """Whether the image document ``u8[start:end]`` has a binary ``picture``: ``(found, error, a, b, c)``.

    The elements are walked until the picture is found (later ones are not checked)."""
    if end - start >= 13 and _same(u8, start + 4, start + 13, _PICTURE_HEADER):
        return 1, 0, 0, 0, 0  # the usual layout: picture first
    pos, last = start + 4, end - 1
    while pos < last:
        t, ne, v, size, err, a, b, c = _element(u8, pos, end)
        if err:
            return 0, err, a, b, c
        if t == 0x05 and _same(u8, pos + 1, ne, _NAME_PICTURE):
            return 1, 0, 0, 0, 0
        pos = v + size
    if pos != last:
        return 0, _BAD_OVERRUN, 0, 0, 0
    return 0, 0, 0, 0, 0


@njit(cache=True, nogil=True)
def _parse_document(u8: np.ndarray, off: int, end: int) -> tuple[int, int, int, int, int, int, int]:
    """``(code, product_id, category_id, n_images, a, b, c)`` of the well-framed document ``u8[off:end]``;
    ``code`` is ``_DOC_OK``, ``_DOC_NO_IMAGES`` or a ``_BAD_*`` code with its values a, b, c."""
    pid, cid, n, has_id = np.int64(0), np.int64(-1), np.int64(0), False
    pos, last = off + 4, end - 1
    while pos < last:
        t, ne, v, size, err, a, b, c = _element(u8, pos, end)
        if err:
            return err, 0, 0, 0, a, b, c
        if _same(u8, pos + 1, ne, _NAME_ID):
            err, value = _integer(u8, t, v)
            if err:
                return err, 0, 0, 0, 0, value, 0
            pid, has_id = value, True
        elif _same(u8, pos + 1, ne, _NAME_CATEGORY):
            err, value = _integer(u8, t, v)
            if err:
                return err, 0, 0, 0, 1, value, 0
            cid = value
        elif _same(u8, pos + 1, ne, _NAME_IMGS):
            if t != 0x04:
                return _BAD_IMGS_NOT_ARRAY, 0, 0, 0, 0, t, 0
            # Count the {picture: <binary>} documents of the array.
            n = 0
            p, array_last = v + 4, v + size - 1
            while p < array_last:
                t2, ne2, v2, size2, err, a, b, c = _element(u8, p, v + size)
                if err:
                    return err, 0, 0, 0, a, b, c
                if t2 != 0x03:
                    return _BAD_IMAGE_NOT_DOCUMENT, 0, 0, 0, n, t2, 0
                if size2 < MIN_DOC or _i32(u8, v2) != size2 or u8[v2 + size2 - 1] != 0:
                    return _BAD_IMAGE_LENGTH, 0, 0, 0, n, 0, 0
                found, err, a, b, c = _has_picture(u8, v2, v2 + size2)
                if err:
                    return err, 0, 0, 0, a, b, c
                if not found:
                    return _BAD_IMAGE_NO_PICTURE, 0, 0, 0, n, 0, 0
                n += 1
                p = v2 + size2
            if p != array_last:
                return _BAD_OVERRUN, 0, 0, 0, 0, 0, 0
        pos = v + size
    if pos != last:
        return _BAD_OVERRUN, 0, 0, 0, 0, 0, 0
    if not has_id:
        return _BAD_NO_ID, 0, 0, 0, 0, 0, 0
    if n == 0:
        return _DOC_NO_IMAGES, pid, cid, 0, 0, 0, 0
    return _DOC_OK, pid, cid, n, 0, 0, 0


@njit(cache=True, nogil=True, inline="always")
def _parse_usual(u8: np.ndarray, off: int, end: int) -> tuple[int, int, int, int]:
    """The usual layout, fast: ``_id``, ``category_id`` (int32 or int64) and ``imgs``, an array of documents
    whose first field is the binary ``picture``, in any order, nothing else. ``(_DOC_OK, product_id,
    category_id, n_images)``, or ``(-1, 0, 0, 0)`` for anything else (then :func:`_parse_document` decides)."""
    pid, cid, n, has_id, has_imgs = np.int64(0), np.int64(-1), np.int64(0), False, False
    pos, last = off + 4, end - 1
    while pos < last:
        t = u8[pos]
        ne = _name_end(u8, pos + 1, last)
        v = ne + 1
        if t == 0x10 or t == 0x12:
            if v + (4 if t == 0x10 else 8) > last:
                return -1, 0, 0, 0
            value = _i32(u8, v) if t == 0x10 else np.int64(_u64(u8, v))
            if _same(u8, pos + 1, ne, _NAME_ID):
                pid, has_id = value, True
            elif _same(u8, pos + 1, ne, _NAME_CATEGORY):
                cid = value
            else:
                return -1, 0, 0, 0
            pos = v + (4 if t == 0x10 else 8)
        elif t == 0x04 and not has_imgs and _same(u8, pos + 1, ne, _NAME_IMGS):
            if v + 5 > last:
                return -1, 0, 0, 0
            size = _i32(u8, v)
            array_last = v + size - 1
            if size < MIN_DOC or array_last >= last or u8[array_last] != 0:
                return -1, 0, 0, 0
            p = v + 4
            while p < array_last:
                if u8[p] != 0x03:
                    return -1, 0, 0, 0
                v2 = _name_end(u8, p + 1, array_last) + 1
                if v2 + 4 > array_last:
                    return -1, 0, 0, 0
                size2 = _i32(u8, v2)
                if size2 < 13 or v2 + size2 > array_last or u8[v2 + size2 - 1] != 0:
                    return -1, 0, 0, 0
                if not _same(u8, v2 + 4, v2 + 13, _PICTURE_HEADER):
                    return -1, 0, 0, 0
                n += 1
                p = v2 + size2
            if p != array_last:
                return -1, 0, 0, 0
            has_imgs = True
            pos = v + size
        else:
            return -1, 0, 0, 0
    if pos != last or not has_id or n == 0:
        return -1, 0, 0, 0
    return _DOC_OK, pid, cid, n


@njit(cache=True, nogil=True)
def _scan_block(u8: np.ndarray, off: int, limit: int, rows: np.ndarray, skipped: np.ndarray) -> tuple:
    """Frame and parse the documents of the file ``u8`` from ``u8[off]`` on, until ``limit`` is
    passed, ``rows`` is full, the file ends or a frame is broken.

    Args:
        u8: the whole file.
        off: where a document starts.
        limit: stop at the first document boundary at or past ``u8[limit]``.
        rows: ``[5, cap]`` int64, filled column by column with (offset, length, product_id, category_id,
            n_images).
        skipped: int64 ``[8]``, updated: documents without images, the first one's offset,
            malformed documents, the first one's offset, then its code and values a, b, c.

    Returns:
        ``(rows filled, offset reached, _STOP_* code, its value)``.
    """
    size = len(u8)
    n = 0
    while off < limit and n < rows.shape[1]:
        left = size - off
        if left == 0:
            break
        if left < 4:
            return n, off, _STOP_STUB, left
        n_bytes = _i32(u8, off)
        if n_bytes < MIN_DOC:
            return n, off, _STOP_BELOW_MIN, n_bytes
        if n_bytes > left:
            return n, off, _STOP_PAST_EOF, n_bytes
        end = off + n_bytes
        if u8[end - 1] != 0:
            return n, off, _STOP_NO_FINAL_ZERO, n_bytes
        code, pid, cid, k = _parse_usual(u8, off, end)
        a, b, c = 0, 0, 0
        if code < 0:
            code, pid, cid, k, a, b, c = _parse_document(u8, off, end)
        if code == _DOC_OK:
            rows[0, n], rows[1, n], rows[2, n], rows[3, n], rows[4, n] = off, n_bytes, pid, cid, k
            n += 1
        elif code == _DOC_NO_IMAGES:
            skipped[0] += 1
            if skipped[1] < 0:
                skipped[1] = off
        else:
            skipped[2] += 1
            if skipped[3] < 0:
                skipped[3], skipped[4], skipped[5], skipped[6], skipped[7] = off, code, a, b, c
        off = end
    return n, off, _STOP_NONE, 0


@njit(cache=True, nogil=True)
def _resync(u8: np.ndarray, start: int) -> int:
    """The first offset at or after ``start`` where a whole, well-formed product document (one with an
    ``_id`` and at least one picture) starts; -1 when there is none before the end of the file."""
    size = len(u8)
    for p in range(start, size - MIN_DOC + 1):
        n_bytes = _i32(u8, p)
        if n_bytes < MIN_DOC or n_bytes > size - p or u8[p + n_bytes - 1] != 0:
            continue
        code, _, _, _ = _parse_usual(u8, p, p + n_bytes)
        if code < 0:
            code = _parse_document(u8, p, p + n_bytes)[0]
        if code == _DOC_OK:
            return p
    return -1


@njit(cache=True, nogil=True)
def _touch(u8: np.ndarray, start: int, stop: int, step: int) -> int:
    """Read one byte of every ``step`` bytes of ``u8[start:stop]``, so that their pages are mapped in."""
    total = 0
    for p in range(start, stop, step):
        total += u8[p]
    return total


def _type_name(t: int) -> str:
    return _TYPE_NAMES.get(t, f"type 0x{t:02x}")


def _stop_reason(code: int, value: int, left: int) -> str:
    """The message for a broken frame found ``left`` bytes before the end of the file."""
    if code == _STOP_STUB:
        return f"truncated document: {value} byte(s) left, fewer than a 4-byte length prefix"
    if code == _STOP_BELOW_MIN:
        return f"length prefix {value} is below the BSON minimum of {MIN_DOC}"
    if code == _STOP_PAST_EOF:
        return f"truncated document: its length prefix says {value} bytes but only {left} remain in the file"
    return f"document of {value} bytes does not end with a 0 byte (bad length prefix)"


def _malformed_reason(u8: np.ndarray, code: int, a: int, b: int, c: int) -> str:
    """What is wrong with a malformed document, from :func:`_parse_document`'s code and values
    (byte positions in the file ``u8``)."""
    field_name = ("_id", "category_id")[a] if code in (_BAD_NOT_INTEGER, _BAD_FRACTIONAL) else ""
    if code == _BAD_NO_ID:
        return "no _id field"
    if code == _BAD_NOT_INTEGER:
        return f"{field_name} is a {_type_name(b)}, not an integer"
    if code == _BAD_FRACTIONAL:
        return f"{field_name} is a double ({_F64.unpack_from(u8, b)[0]!r}), not an integer"
    if code == _BAD_IMGS_NOT_ARRAY:
        return f"imgs is a {_type_name(b)}, not an array"
    if code == _BAD_IMAGE_NOT_DOCUMENT:
        return f"imgs[{a}] is a {_type_name(b)}, not a document"
    if code == _BAD_IMAGE_LENGTH:
        return f"imgs[{a}] has a bad length"
    if code == _BAD_IMAGE_NO_PICTURE:
        return f"imgs[{a}] has no binary 'picture' field"
    if code == _BAD_UNKNOWN_TYPE:
        return f"unknown BSON element type 0x{b:02x} at byte {a}"
    if code == _BAD_UNTERMINATED_NAME:
        return f"unterminated field name at byte {a}"
    if code == _BAD_FIELD_PAST_END:
        name = u8[a:b].tobytes()
        if c < 0:
            return f"field {name!r} runs past its document"
        return f"field {name!r} of {c} bytes runs past its document"
    if code == _BAD_UNTERMINATED_REGEX:
        return f"unterminated regex at byte {a}"
    return "fields overrun the document's end"


def scan_dump(path: str | Path, *, progress: bool = True) -> BsonIndex:
    """Index a dump in one sequential pass (never raises for bad content; see the report).

    Args:
        path: the ``.bson`` dump.
        progress: show a tqdm progress bar (bytes) on stderr.

    Returns:
        The index; ``index.report`` says what was skipped and where the pass stopped.

    Raises:
        DumpError: the file is missing or unreadable, or shrank during the pass.
    """
    path = Path(path)
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below)
    except OSError as e:
        raise DumpError(f"{path}: cannot open the dump ({e.strerror}); check the path") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            with tqdm(total=size, unit="B", unit_scale=True, desc=path.name, disable=not progress, leave=False) as bar:
                return _scan(path, f, size, bar)
        except OSError as e:
            raise DumpError(f"{path}: read failed during indexing ({e.strerror or e}); check the disk") from None


class _Pass:
    """The state of one pass: the rows found so far and the first malformed document's reason."""

    def __init__(self) -> None:
        self.rows = np.empty((5, _ROWS), np.int64)
        self.skipped = np.array([0, -1, 0, -1, 0, 0, 0, 0], np.int64)
        self.chunks: list[np.ndarray] = []
        self.malformed_reason: str | None = None

    def run(self, u8: np.ndarray, off: int, limit: int) -> tuple[int, int, int]:
        """:func:`_scan_block` until ``limit`` or a stop; ``(offset reached, code, value)``."""
        while True:
            had_malformed = self.skipped[3] >= 0
            n, off, stop, value = _scan_block(u8, off, limit, self.rows, self.skipped)
            self.chunks.append(self.rows[:, :n].copy())
            if not had_malformed and self.skipped[3] >= 0:
                code, a, b, c = (int(x) for x in self.skipped[4:])
                self.malformed_reason = _malformed_reason(u8, code, a, b, c)
            if n < self.rows.shape[1] or stop != _STOP_NONE:
                return off, stop, value


def _scan(path: Path, f, size: int, bar: tqdm) -> BsonIndex:
    """Scan the dump through one read-only map of the whole file, :data:`_WINDOW` bytes at a time,
    each window mapped in just before the compiled loop scans it."""
    state = _Pass()
    off, stop, value = 0, _STOP_NONE, 0
    first = None  # (offset, code, value, products before it) of the first broken frame
    damaged = lost = 0
    resume: int | None = None
    with _FileMap(f.fileno(), size) as file_map:
        for i, (_, end) in enumerate(windows := _windows(size)):
            if i:  # the first window is mapped in by its scan's faults
                file_map.advance(off, *windows[i])  # (or the file shrank: OSError)
            while True:
                off, stop, value = state.run(file_map.u8, off, end)
                if stop == _STOP_NONE:
                    break
                # A broken frame: resume at the next good document, if any.
                damaged += 1
                if first is None:
                    first = (off, stop, value, sum(c.shape[1] for c in state.chunks))
                found = _resync(file_map.u8, off + 1)
                if found < 0:
                    lost += size - off
                    off = size
                    break
                lost += found - off
                off = found
                if resume is None:
                    resume = found
                if off >= end:
                    break
            bar.update(off - bar.n)
            if off >= size:
                break
    indexed = size - lost
    table = np.concatenate(state.chunks, axis=1) if state.chunks else np.zeros((5, 0), np.int64)
    stop_reason = _stop_reason(first[1], first[2], size - first[0]) if first is not None else None
    n_no_images, first_no_images, n_malformed, first_malformed = (int(x) for x in state.skipped[:4])
    counts = Counter(no_images=n_no_images, malformed=n_malformed)
    firsts = [
        first_no_images if n_no_images else None,
        (first_malformed, f"malformed document ({state.malformed_reason})") if n_malformed else None,
    ]
    index = _finish(path, size, table, indexed, stop_reason, first[0] if first else None, counts, firsts)
    if first is not None:
        index.report.n_damaged, index.report.resume_offset = damaged, resume
        index.report.n_recovered = len(index) - first[3]
    return index


def _windows(size: int) -> list[tuple[int, int]]:
    """The scan's steps ``(start, end)`` over a file of ``size`` bytes: a short first one, then :data:`_WINDOW` each."""
    bounds = [0, *range(min(_FIRST_WINDOW, _WINDOW), size, _WINDOW), size] if size else []
    return list(itertools.pairwise(bounds))


def _in_page_cache(fd: int, offset: int) -> bool:
    """Whether the byte at ``offset`` of the file is in the page cache (a read that may not wait for
    the disk); True where the system cannot tell."""
    if not hasattr(os, "RWF_NOWAIT"):
        return True
    try:
        return os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT) == 1
    except BlockingIOError:
        return False
    except OSError:  # a file system without non-blocking reads
        return True


def _shrank(now: int, needed: int) -> OSError:
    return OSError(0, f"the file now ends at byte {now}, before byte {needed}: it shrank during the pass")


class _FileMap:
    """The whole file (``size`` bytes of ``fd``), memory-mapped read-only as ``u8``. :meth:`advance`
    unmaps the pages the scan has passed (they stay in the page cache) and maps in
    the next window, so the process never maps more than a few windows however large the dump."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.released = fd, 0
        self.mm: mmap.mmap | None = None
        self.u8 = np.zeros(0, np.uint8)
        if size == 0:  # an empty file cannot be mapped (and has nothing to scan)
            return
        try:  # mmap checks the file's size: touching a page past its end would kill the process
            self.mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except ValueError:
            raise _shrank(os.lseek(fd, 0, os.SEEK_END), size) from None
        if hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            self.mm.madvise(mmap.MADV_SEQUENTIAL)  # the scan's faults read ahead on a cold file
        self.u8 = np.frombuffer(self.mm, dtype=np.uint8)

    def advance(self, scanned: int, start: int, stop: int) -> None:
        """Unmap the whole pages before ``scanned``; then check the file still holds bytes ``[start, stop)``
        and, if they are in the page cache, map their pages in. Pages still on the disk are left to the
        scan: its faults read them with the kernel's sequential read-ahead, which measured faster than
        reading them here (by touch or ``MADV_WILLNEED``) while the scan waits."""
        assert self.mm is not None  # a dump of one window or less has no second window
        behind = scanned - scanned % mmap.PAGESIZE
        if behind > self.released and hasattr(mmap, "MADV_DONTNEED"):
            self.mm.madvise(mmap.MADV_DONTNEED, self.released, behind - self.released)
            self.released = behind
        now = os.fstat(self.fd).st_size
        if now < stop:
            raise _shrank(now, stop)
        if _in_page_cache(self.fd, stop - 1):
            _touch(self.u8, start - start % mmap.PAGESIZE, stop, mmap.PAGESIZE)

    def __enter__(self) -> _FileMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.u8 = np.zeros(0, np.uint8)  # release the buffer before the map closes
        if self.mm is not None:
            with contextlib.suppress(BufferError):  # an exception's traceback may still hold a view
                self.mm.close()


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
    cols = list(table)  # [5, N] C-contiguous: each row already is a contiguous column
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
    if len(index) > 1:
        order = np.argsort(index.product_id, kind="stable")
        repeat = np.zeros(len(index), bool)
        repeat[order[1:]] = index.product_id[order[1:]] == index.product_id[order[:-1]]
        if repeat.any():
            first = int(np.flatnonzero(repeat)[0])
            r.n_duplicate_ids = int(repeat.sum())
            r.first_duplicate_offset, r.first_duplicate_id = int(index.offset[first]), int(index.product_id[first])
    labelled = index.category_id[index.category_id >= 0]
    r.n_categories = _n_distinct(labelled)
    r.n_without_category = int(len(index) - len(labelled))


def _n_distinct(values: np.ndarray) -> int:
    """How many distinct integers: counted over their range when it is short (category ids: 22k
    wide for Cdiscount's; 3.8 ms against 12.9 ms for a sort of 435k of them), else by a sort."""
    if not len(values):
        return 0
    low, high = int(values.min()), int(values.max())
    if high - low < 4 * len(values) + (1 << 16):
        return int(np.count_nonzero(np.bincount(values - low)))
    return len(np.unique(values))


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
    mtime, same index version) and matches it; else None."""
    return _load_index(Path(dump), Path(index_file))[0]


def _load_index(dump: Path, index_file: Path) -> tuple[BsonIndex | None, str | None]:
    """``(index, None)``; or ``(None, why)`` for an index file that exists but is damaged or does not match
    the dump (``why`` is None for one that is absent or stale: nothing to warn about)."""
    if not index_file.is_file():
        return None, None
    try:
        with np.load(index_file, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("version") != INDEX_VERSION or tuple(meta.get("stamp", ())) != _stamp(dump):
                return None, None
            cols = [z[k].astype(np.int64, copy=False) for k in ("offset", "length", "product_id", "category_id")]
            cols.append(z["n_images"].astype(np.int64))
        report = IndexReport(**meta["report"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        return None, f"{index_file}: damaged index file ({type(e).__name__}); built the index again"
    if not _matches(dump, cols[0], cols[1]):
        return None, f"{index_file}: does not match {dump} (its offsets miss the documents); built the index again"
    report.path = str(dump)
    report.images_per_product = {int(k): v for k, v in report.images_per_product.items()}
    report.reused = True
    report.index_file = str(index_file)
    return BsonIndex(*cols, report=report), None


def _matches(dump: Path, offset: np.ndarray, length: np.ndarray, n_checks: int = 256) -> bool:
    """Whether the offsets of an index file fit the dump: in order, inside the file, and (for up to
    ``n_checks`` rows spread over it) a document of the recorded length starts at each."""
    size = dump.stat().st_size
    if len(offset) != len(length):
        return False
    if not len(offset):
        return True
    ends = offset + length
    if offset[0] < 0 or ends[-1] > size or np.any(length < MIN_DOC) or np.any(offset[1:] < ends[:-1]):
        return False
    rows = np.unique(np.linspace(0, len(offset) - 1, min(n_checks, len(offset))).astype(np.int64))
    with open(dump, "rb", buffering=0) as f:
        for r in rows:
            off, n = int(offset[r]), int(length[r])
            if os.pread(f.fileno(), 4, off) != struct.pack("<i", n) or os.pread(f.fileno(), 1, off + n - 1) != b"\0":
                return False
    return True


def save_index(index: BsonIndex, dump: str | Path, index_file: str | Path, stamp: tuple[int, int]) -> None:
    """Write the index atomically (temporary file in the same folder, then rename).

    Raises:
        OSError: the folder is not writable.
    """
    report = asdict(index.report)
    report.pop("reused"), report.pop("index_file")
    meta = {"version": INDEX_VERSION, "stamp": list(stamp), "dump": str(dump), "report": report}
    with atomic_open(index_file, "wb") as f:
        np.savez(
            f,
            meta=np.array(json.dumps(meta)),
            offset=index.offset,
            length=index.length.astype(np.int32),  # documents are < 2 GiB by the BSON spec
            product_id=index.product_id,
            category_id=index.category_id,
            n_images=index.n_images.astype(np.int16),
        )


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
    index, warning = None, None
    if not rebuild:
        for candidate in candidates:
            index, why = _load_index(dump, candidate)
            warning = warning or why
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
        index.report.index_warning = warning
    if strict and not index.report.ok:
        raise DumpError(index.report.problems()[0])
    return index
