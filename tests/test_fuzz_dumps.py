"""Damaged dumps at random (hypothesis): truncations, bit flips, length-prefix edits, repeated and
reordered documents.

The invariant: the index answers for every good product it can reach, or names in one line
what it could not; no command tracebacks; every product it keeps is the one bson reads there.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import bson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hierclass.cli import app
from hierclass.data import open_source, scan_dump
from hierclass.errors import DumpError

runner = CliRunner()
N_DOCS = 6


def _doc(k: int) -> bytes:
    imgs = [{"picture": bytes([0xFF, 0xD8, k, j]) * (3 + k)} for j in range(1 + k % 3)]
    return bson.encode({"_id": 100 + k, "category_id": 10 + k % 2, "imgs": imgs})


DOCS = [_doc(k) for k in range(N_DOCS)]
PREFIXES = [0, 1, 3, 4, 5, 6, 12, -1, -(2**31), 2**31 - 1, 2**20]

byte_edit = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("prefix"), st.integers(0, 2 * N_DOCS), st.sampled_from(PREFIXES)),
    st.tuples(st.just("prefix_off_by"), st.integers(0, 2 * N_DOCS), st.integers(-3, 3)),
)


@st.composite
def damaged_dumps(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes]]]:
    """``(file bytes, [(offset, document) still intact])``."""
    order = draw(st.lists(st.integers(0, N_DOCS - 1), min_size=0, max_size=2 * N_DOCS))  # repeats, reorders
    docs = [DOCS[k] for k in order]
    starts, pos = [], 0
    for d in docs:
        starts.append(pos)
        pos += len(d)
    data = bytearray(b"".join(docs))
    touched: set[int] = set()  # documents whose bytes changed
    for edit in draw(st.lists(byte_edit, max_size=3)):
        if not data:
            break
        if edit[0] == "flip":
            at = int(edit[1] * len(data))
            data[at] ^= 1 << edit[2]
            touched.update(i for i, s in enumerate(starts) if s <= at < s + len(docs[i]))
        elif docs:
            i = edit[1] % len(docs)
            old = int.from_bytes(data[starts[i] : starts[i] + 4], "little", signed=True)
            value = edit[2] if edit[0] == "prefix" else old + edit[2]
            data[starts[i] : starts[i] + 4] = (value % 2**32).to_bytes(4, "little")
            if value != old:
                touched.add(i)
    cut = len(data)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
    intact = [
        (s, d) for i, (s, d) in enumerate(zip(starts, docs, strict=True)) if i not in touched and s + len(d) <= cut
    ]
    return bytes(data), intact


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=damaged_dumps())
def test_damaged_dumps_never_lose_a_product_silently(case: tuple[bytes, list[tuple[int, bytes]]]) -> None:
    data, intact = case
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "d.bson"
        dump.write_bytes(data)
        index = scan_dump(dump, progress=False)
        r = index.report
        kept = dict(zip(index.offset.tolist(), index.product_id.tolist(), strict=True))
        # every product kept is the one bson reads there
        for off, length, pid in zip(index.offset, index.length, index.product_id, strict=True):
            try:
                doc = bson.decode(data[off : off + length])
            except Exception:  # bson is stricter than the scanner (UTF-8 names): nothing to compare
                continue
            assert doc["_id"] == pid
        # a good document not indexed is named in the report
        missed = [off for off, doc in intact if off not in kept]
        if missed:
            assert not r.ok and r.problems(), (missed, r)
        assert all("\n" not in line for line in r.problems())
        # reading every product kept never tracebacks
        source = open_source(dump, progress=False)
        for p in range(len(source)):
            with contextlib.suppress(DumpError):
                source.read_images(p)
        # the command: exit 0 with a warning per problem, or one error line; never a traceback
        for args in (["index", str(dump), "--no-progress"], ["index", str(dump), "--no-progress", "--strict"]):
            result = runner.invoke(app, args)
            assert result.exit_code in (0, 1), result.output
            assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
            errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
            if result.exit_code == 1:
                assert len(errors) == 1
            else:
                assert len(index) > 0 and not errors
                assert len([w for w in result.stderr.splitlines() if w.startswith("warning: ")]) == len(r.problems())


def test_the_fuzz_reaches_past_a_broken_frame() -> None:
    """A check of the check: the good documents after a broken length prefix are found again."""
    data = bytearray(b"".join(DOCS))
    data[len(DOCS[0]) : len(DOCS[0]) + 4] = (3).to_bytes(4, "little")
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "d.bson"
        dump.write_bytes(bytes(data))
        index = scan_dump(dump, progress=False)
    assert index.product_id.tolist() == [100, 102, 103, 104, 105]
