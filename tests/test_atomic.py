from __future__ import annotations

from pathlib import Path

import pytest

from hierclass.atomic import atomic_open, atomic_path


def test_success_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with atomic_open(target, "w") as f:
        f.write("new")
        assert not target.exists()  # nothing visible until the write is complete
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]


def test_failure_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
