"""Write files so that a reader never sees half of one: a temporary file beside, then a rename.

Every file hierclass writes for later use (dumps, indexes, feature metadata, checkpoints,
ONNX exports, reports, prediction CSVs) goes through :func:`atomic_path` or
:func:`atomic_open`, so a job killed midway leaves the previous file, or none, never a
truncated one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    On any exception the temporary file is removed and the exception propagates; ``path``
    keeps whatever it held before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique per process: two writers never share it
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. a read-only file system: the first error is the one to report
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; it replaces ``path`` once closed without error."""
    with atomic_path(path) as tmp, tmp.open(mode, **kwargs) as f:
        yield f
