"""The BSON offset index: real sample dump, reuse / invalidation, and every kind of bad input."""

from __future__ import annotations

import os
from pathlib import Path

import bson
import numpy as np
import pytest

from hierclass.data import (
    BsonDump,
    bson_index,
    build_index,
    make_jpeg,
    open_source,
    scan_dump,
    synthetic_products,
    write_dump,
)
from hierclass.errors import DumpError
from hierclass.taxonomy import Taxonomy


def _doc(pid: int, cid: int | None = 10, n: int = 1, *, first: str = "imgs") -> bytes:
    d: dict = {"_id": pid}
    if first == "category_id" and cid is not None:
        d["category_id"] = cid
    d["imgs"] = [{"picture": make_jpeg(pid * 10 + k)} for k in range(n)]
    if first == "imgs" and cid is not None:
        d["category_id"] = cid
    return bson.encode(d)


def _dump(tmp_path: Path, *docs: bytes, name: str = "d.bson") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(docs))
    return path


def _same_index_with_any_buffer(dump: Path, index, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan's window size changes nothing: documents that cross a window's end, or span several
    windows, give the same rows, counts, offsets and messages."""
    for chunk in (16, 97, 1000):
        with monkeypatch.context() as m:
            m.setattr(bson_index, "_WINDOW", chunk)
            other = scan_dump(dump, progress=False)
        for name in ("offset", "length", "product_id", "category_id", "n_images"):
            assert getattr(other, name).tolist() == getattr(index, name).tolist(), (chunk, name)
        assert other.report == index.report, chunk


# ---------------------------------------------------------------------- the real sample
def test_real_sample_index(
    cdiscount_sample_bson: Path, cdiscount_taxonomy_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = build_index(cdiscount_sample_bson, cache_dir=tmp_path, progress=False)
    r = index.report
    assert (r.n_products, r.n_images, r.n_categories) == (82, 110, 36)
    assert r.ok and r.unindexed_bytes == 0 and r.indexed_bytes == cdiscount_sample_bson.stat().st_size
    assert r.images_per_product == {1: 67, 2: 7, 3: 3, 4: 5}
    with cdiscount_sample_bson.open("rb") as f:
        docs = list(bson.decode_file_iter(f))
    assert index.product_id.tolist() == [d["_id"] for d in docs]
    assert index.category_id.tolist() == [d["category_id"] for d in docs]
    assert index.n_images.tolist() == [len(d["imgs"]) for d in docs]
    assert int(index.offset[0]) == 0 and np.all(index.offset[1:] == index.offset[:-1] + index.length[:-1])
    _same_index_with_any_buffer(cdiscount_sample_bson, scan_dump(cdiscount_sample_bson, progress=False), monkeypatch)
    tax = Taxonomy.from_csv(cdiscount_taxonomy_csv)
    assert (tax.encode(index.category_id, unknown=-1) >= 0).all()


def test_scanner_matches_bson_on_both_layouts_and_int64(tmp_path: Path) -> None:
    docs = [
        _doc(1, 10, 1),
        _doc(2, 11, 3, first="category_id"),
        bson.encode({"_id": bson.Int64(2**40), "imgs": [{"picture": b"\xff\xd8x"}], "category_id": bson.Int64(2**35)}),
        bson.encode({"_id": 4, "imgs": [{"other": 1, "picture": b"\xff\xd8y"}], "note": "x" * 3, "category_id": 5}),
        bson.encode({"_id": 5, "imgs": [{"picture": make_jpeg(k)} for k in range(12)]}),  # > 10 images, no category
    ]
    index = scan_dump(_dump(tmp_path, *docs), progress=False)
    assert index.report.ok
    assert index.product_id.tolist() == [1, 2, 2**40, 4, 5]
    assert index.category_id.tolist() == [10, 11, 2**35, 5, -1]
    assert index.n_images.tolist() == [1, 3, 1, 1, 12]
    assert index.report.n_without_category == 1


def test_distinct_categories_counted_however_far_apart(tmp_path: Path) -> None:
    near = scan_dump(_dump(tmp_path, _doc(1, 7), _doc(2, 9), _doc(3, 7), name="near.bson"), progress=False)
    far = scan_dump(_dump(tmp_path, _doc(1, 7), _doc(2, 2**40), _doc(3, 7), name="far.bson"), progress=False)
    assert near.report.n_categories == far.report.n_categories == 2


def test_page_cache_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A window is mapped in ahead of the scan only if it is cached: the probe tells a cached file from one that
    is not (where the file system lets the test drop it from the cache), and either way the pass
    finds the same documents."""
    path = _dump(tmp_path, *(_doc(pid) for pid in range(1, 50)))
    monkeypatch.setattr(bson_index, "_WINDOW", 4096)  # several windows, so each one is probed
    fd = os.open(path, os.O_RDONLY)
    try:
        warm = scan_dump(path, progress=False)
        assert bson_index._in_page_cache(fd, path.stat().st_size - 1)
        if not hasattr(os, "POSIX_FADV_DONTNEED") or not hasattr(os, "RWF_NOWAIT"):
            pytest.skip("this system cannot drop a file from the page cache, or cannot ask whether it is there")
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if bson_index._in_page_cache(fd, path.stat().st_size - 1):
            pytest.skip(f"the file system of {tmp_path} keeps the file cached (tmpfs?)")
        cold = scan_dump(path, progress=False)
        assert cold.offset.tolist() == warm.offset.tolist() and len(cold) == 49
    finally:
        os.close(fd)


def test_empty_dump(tmp_path: Path) -> None:
    index = scan_dump(_dump(tmp_path), progress=False)
    assert len(index) == 0 and index.report.ok


# ---------------------------------------------------------------------- reuse and invalidation
def test_index_file_reused_until_size_or_mtime_changes(tmp_path: Path) -> None:
    dump = tmp_path / "d.bson"
    write_dump(dump, synthetic_products(5))
    first = build_index(dump, progress=False)
    assert not first.report.reused and first.report.index_file == str(tmp_path / "d.bson.idx.npz")
    again = build_index(dump, progress=False)
    assert again.report.reused and again.product_id.tolist() == first.product_id.tolist()
    assert again.report.images_per_product == first.report.images_per_product

    st = dump.stat()
    os.utime(dump, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: rebuild
    assert not build_index(dump, progress=False).report.reused
    assert build_index(dump, progress=False).report.reused

    with dump.open("ab") as f:  # grown: rebuild, and it sees the new product
        f.write(_doc(77))
    grown = build_index(dump, progress=False)
    assert not grown.report.reused and grown.product_id.tolist()[-1] == 77


def test_index_goes_to_cache_dir_when_folder_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dump = tmp_path / "d.bson"
    write_dump(dump, synthetic_products(2))
    real_save = bson_index.save_index

    def save(index, dump_, index_file, stamp):  # the dump's folder refuses writes (tests may run as root)
        if Path(index_file).parent == tmp_path:
            raise PermissionError(13, "Permission denied")
        real_save(index, dump_, index_file, stamp)

    monkeypatch.setattr(bson_index, "save_index", save)
    monkeypatch.setenv("HIERCLASS_CACHE_DIR", str(tmp_path / "cache"))
    index = build_index(dump, progress=False)
    assert Path(index.report.index_file).parent == tmp_path / "cache"
    assert build_index(dump, progress=False).report.reused


def test_explicit_cache_dir_and_damaged_index_file(tmp_path: Path) -> None:
    dump = tmp_path / "d.bson"
    write_dump(dump, synthetic_products(3))
    index = build_index(dump, cache_dir=tmp_path / "c", progress=False)
    assert Path(index.report.index_file).parent == tmp_path / "c"
    assert not (tmp_path / "d.bson.idx.npz").exists()
    Path(index.report.index_file).write_bytes(b"garbage")
    rebuilt = build_index(dump, cache_dir=tmp_path / "c", progress=False)
    assert not rebuilt.report.reused and len(rebuilt) == 3
    assert not list((tmp_path / "c").glob("*.tmp"))


# ---------------------------------------------------------------------- bad input
def test_truncated_last_document(tmp_path: Path) -> None:
    good = [_doc(1), _doc(2, n=2)]
    last = _doc(3)
    dump = _dump(tmp_path, *good, last[:-20])
    index = build_index(dump, progress=False)
    r = index.report
    assert index.product_id.tolist() == [1, 2]
    assert r.stop_offset == len(good[0]) + len(good[1])
    assert r.unindexed_bytes == len(last) - 20
    assert "truncated" in r.stop_reason and str(len(last)) in r.stop_reason
    (line,) = r.problems()
    assert line.startswith(f"{dump}:{r.stop_offset}: truncated") and "\n" not in line
    with pytest.raises(DumpError, match=rf"^{dump}:{r.stop_offset}: truncated"):
        build_index(dump, progress=False, strict=True)  # also from the reused index file


@pytest.mark.parametrize(
    ("tail", "found"),
    [
        (b"\x03\x00\x00\x00\x00\x00\x00\x00", "below the BSON minimum"),
        (b"\xff\xff\x00\x00" + b"\x00" * 30, "65535 bytes but only"),
        (b"\x01\x00", "fewer than a 4-byte length"),  # at the very end
        (b"\x09\x00\x00\x00abcd\x01", "does not end with a 0 byte"),
    ],
    ids=["below-minimum", "past-end", "stub", "no-final-zero"],
)
def test_bad_length_prefix(tmp_path: Path, tail: bytes, found: str, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _doc(1)
    dump = _dump(tmp_path, good, tail, *([] if len(tail) < 4 else [_doc(2)]))
    index = scan_dump(dump, progress=False)
    recovered = len(tail) >= 4  # the good document after the broken frame is found again
    assert index.product_id.tolist() == ([1, 2] if recovered else [1])
    assert index.report.stop_offset == len(good) and found in index.report.stop_reason
    assert index.report.unindexed_bytes == len(tail)
    assert index.report.n_recovered == int(recovered)
    assert index.report.resume_offset == (len(good) + len(tail) if recovered else None)
    _same_index_with_any_buffer(dump, index, monkeypatch)


def test_documents_without_images_are_skipped_and_counted(tmp_path: Path) -> None:
    no_imgs = bson.encode({"_id": 2, "category_id": 10})
    zero = bson.encode({"_id": 3, "imgs": [], "category_id": 10})
    dump = _dump(tmp_path, _doc(1), no_imgs, zero, _doc(4))
    r = scan_dump(dump, progress=False).report
    assert (r.n_products, r.n_no_images, r.first_no_images_offset) == (2, 2, len(_doc(1)))
    assert r.stop_offset is None and r.unindexed_bytes == 0
    assert "2 such document(s) skipped" in r.problems()[0]
    with pytest.raises(DumpError, match="without images"):
        build_index(dump, progress=False, strict=True)


@pytest.mark.parametrize(
    ("doc", "found"),
    [
        ({"imgs": [{"picture": b"x"}]}, "no _id"),
        ({"_id": "abc", "imgs": [{"picture": b"x"}]}, "_id is a string"),
        ({"_id": 1, "imgs": [{"picture": b"x"}], "category_id": 1.5}, "category_id is a double (1.5), not an integer"),
        ({"_id": 1, "imgs": [{"picture": b"x"}], "category_id": True}, "category_id is a bool, not an integer"),
        ({"_id": 1, "imgs": {"picture": b"x"}}, "imgs is a document"),
        ({"_id": 1, "imgs": [b"x"]}, "imgs[0] is a binary"),
        ({"_id": 1, "imgs": [{"pic": b"x"}]}, "no binary 'picture'"),
        ({"_id": 1, "imgs": [{"picture": "x"}]}, "imgs[0] has no binary 'picture'"),  # a string, not binary
        ({"_id": 1, "imgs": [{"picture": b"x"}, 7]}, "imgs[1] is a type 0x10, not a document"),
    ],
)
def test_malformed_documents_are_skipped_and_counted(
    tmp_path: Path, doc: dict, found: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = bson.encode(doc)
    dump = _dump(tmp_path, _doc(1), bad, _doc(2))
    index = scan_dump(dump, progress=False)
    assert index.product_id.tolist() == [1, 2]
    assert index.report.n_malformed == 1 and index.report.first_malformed_offset == len(_doc(1))
    assert found in index.report.first_malformed_reason
    _same_index_with_any_buffer(dump, index, monkeypatch)


def test_garbage_inside_a_well_framed_document(tmp_path: Path) -> None:
    good = _doc(1)
    broken = bytearray(_doc(2))
    broken[4] = 0x42  # unknown element type
    dump = _dump(tmp_path, good, bytes(broken), _doc(3))
    index = scan_dump(dump, progress=False)
    assert index.product_id.tolist() == [1, 3] and "unknown BSON element type" in index.report.first_malformed_reason


@pytest.mark.parametrize("when", ["before the map", "between windows"])
def test_dump_shrinking_during_the_pass_is_a_dump_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    dump = _dump(tmp_path, *(_doc(pid) for pid in range(1, 9)))
    size = dump.stat().st_size
    sizes = iter([size + 100] if when == "before the map" else [size])  # what the pass saw first

    class Stat:  # then it ends at byte 100 (cutting the dump for real could SIGBUS)
        def __init__(self, fd: int) -> None:
            self.st_size = next(sizes, 100)

    monkeypatch.setattr(bson_index.os, "fstat", Stat)
    monkeypatch.setattr(bson_index, "_WINDOW", 64)  # several windows: each one is checked
    assert size > 3 * 64
    now = size if when == "before the map" else 100
    message = rf"^{dump}: read failed during indexing \(the file now ends at byte {now}, before byte \d+: it shrank"
    with pytest.raises(DumpError, match=message):
        scan_dump(dump, progress=False)


def test_missing_dump_is_a_dump_error(tmp_path: Path) -> None:
    with pytest.raises(DumpError, match="not found"):
        build_index(tmp_path / "nope.bson")
    with pytest.raises(DumpError, match="not found"):
        open_source(tmp_path / "nope.bson")
    with pytest.raises(DumpError, match="unknown kind"):
        open_source(_dump(tmp_path, name="x.txt"))


def test_unknown_category_kept_and_encoded_minus_one(tmp_path: Path) -> None:
    tax = Taxonomy.from_rows([(10, "A", "a", "x"), (11, "A", "a", "y")])
    dump = _dump(tmp_path, _doc(1, 10), _doc(2, 99), _doc(3, 11))
    source = open_source(dump, progress=False)
    assert isinstance(source, BsonDump)
    assert source.category_ids.tolist() == [10, 99, 11]
    assert tax.encode(source.category_ids, unknown=-1).tolist() == [0, -1, 1]


def test_picture_bytes_that_look_like_a_document_start(tmp_path: Path) -> None:
    fake = b"\x30\x00\x00\x00\x10_id\x00\x07\x00\x00\x00\x04imgs\x00" + b"\x00" * 40
    docs = [_doc(1), bson.encode({"_id": 2, "imgs": [{"picture": fake}, {"picture": fake}], "category_id": 3}), _doc(4)]
    index = scan_dump(_dump(tmp_path, *docs), progress=False)
    assert index.report.ok and index.product_id.tolist() == [1, 2, 4] and index.n_images.tolist() == [1, 2, 1]


def test_integral_double_ids_are_integers(tmp_path: Path) -> None:
    """Some exporters write ids as doubles; an integral one is read as the integer it holds."""
    doc = bson.encode({"_id": 7.0, "imgs": [{"picture": b"\xff\xd8x"}], "category_id": 1000010653.0})
    index = scan_dump(_dump(tmp_path, doc), progress=False)
    assert index.report.ok and index.product_id.tolist() == [7] and index.category_id.tolist() == [1000010653]


def test_field_running_past_its_document(tmp_path: Path) -> None:
    broken = bytearray(_doc(2))
    imgs = broken.index(b"\x04imgs\x00") + 6
    broken[imgs : imgs + 4] = (10**6).to_bytes(4, "little")  # the imgs array claims 1 MB
    index = scan_dump(_dump(tmp_path, _doc(1), bytes(broken), _doc(3)), progress=False)
    assert index.product_id.tolist() == [1, 3]
    assert "field b'imgs' of 1000000 bytes runs past its document" in index.report.first_malformed_reason


def test_random_damage_never_crashes_and_keeps_the_frame_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled scanner does no bounds checks of its own: flip, cut and overwrite bytes at random
    and check that it still stops cleanly, that the rows chain, and that every document it keeps is
    the product bson reads there."""
    rng = np.random.default_rng(0)
    clean = b"".join(
        [_doc(k, 10 + k, 1 + k % 3, first="imgs" if k % 2 else "category_id") for k in range(1, 9)]
        + [bson.encode({"_id": 99, "x": {"y": [1.5, "z", None, True]}, "imgs": [{"a": 1, "picture": b"p"}]})]
    )
    for trial in range(300):
        data = bytearray(clean)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(data)))
            data[at] = int(rng.integers(0, 256)) if rng.random() < 0.7 else rng.choice([0, 1, 3, 4, 5, 0x7F, 0xFF])
        if trial % 5 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        dump = _dump(tmp_path, bytes(data), name=f"f{trial}.bson")
        index = scan_dump(dump, progress=False)
        if trial % 3 == 0:
            _same_index_with_any_buffer(dump, index, monkeypatch)
        r = index.report
        assert r.indexed_bytes + r.unindexed_bytes == len(data)
        ends = index.offset + index.length
        assert np.all(ends <= len(data)) and np.all(index.offset[1:] >= ends[:-1])
        for off, length, pid, n in zip(index.offset, index.length, index.product_id, index.n_images, strict=True):
            try:
                doc = bson.decode(bytes(data[off : off + length]))
            except Exception:  # bson is stricter (UTF-8 of names, picture internals): nothing to compare
                continue
            assert doc["_id"] == pid and len(doc["imgs"]) == n


def test_good_documents_after_a_bad_length_prefix_are_recovered(tmp_path: Path) -> None:
    """A length prefix set below the minimum in the middle of a dump: the documents after it are found again."""
    docs = [_doc(k, 10 + k, 1 + k % 3) for k in range(1, 11)]
    data = bytearray(b"".join(docs))
    at = sum(len(d) for d in docs[:4])
    data[at : at + 4] = (3).to_bytes(4, "little")  # document 5 is lost, 6..10 follow intact
    index = scan_dump(_dump(tmp_path, bytes(data)), progress=False)
    r = index.report
    assert index.product_id.tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert (r.stop_offset, r.resume_offset, r.n_recovered, r.n_damaged) == (at, at + len(docs[4]), 5, 1)
    assert r.unindexed_bytes == len(docs[4]) and not r.ok
    (line,) = r.problems()
    assert "recovered 5 good product(s)" in line and "\n" not in line
