"""Check an output location before the work starts, and word operating-system errors as one line.

A long command (extraction, training, prediction) checks where it will write first, so that
a typo or a read-only disk is found in a second rather than after hours of work. Any
``OSError`` that still happens (a disk that fills up midway) becomes an
:class:`~hierclass.errors.OutputError` with the path and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from hierclass.errors import OutputError

_FIXES = {
    errno.EACCES: "check its permissions, or write somewhere else",
    errno.EPERM: "check its permissions, or write somewhere else",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.ENOSPC: "the disk is full; free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up; free some space or write somewhere else",
    errno.EISDIR: "it is a folder; pass a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; pass another path",
    errno.ENOENT: "check the path",
    errno.EIO: "the disk reported an input/output error; check the disk",
}


def os_error_message(error: OSError, option: str | None = None) -> str:
    """One line for an operating-system error: the path, what went wrong, and the fix.

    Args:
        error: the error.
        option: the command-line option that named the path (e.g. ``--out``), if any.
    """
    where = error.filename if error.filename is not None else None
    what = error.strerror or str(error) or type(error).__name__
    fix = _FIXES.get(error.errno or 0, "check the path and the disk")
    named = f" ({option})" if option else ""
    return f"{where}{named}: {what}; {fix}" if where is not None else f"{what}{named}; {fix}"


def _probe(folder: Path, option: str) -> None:
    """Create, write and remove a small file in ``folder``, so that a folder that cannot be written fails now."""
    try:
        fd, name = tempfile.mkstemp(prefix=".hierclass-probe-", dir=folder)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)
    except OSError as e:
        fix = _FIXES.get(e.errno or 0, "write somewhere else") if e.errno != errno.ENOENT else "write somewhere else"
        raise OutputError(f"{folder} ({option}): cannot create a file there ({e.strerror or e}); {fix}") from None


def check_writable_dir(path: str | Path, option: str = "--out") -> Path:
    """Make sure ``path`` is a folder this process can write in (created if missing).

    Args:
        path: the output folder.
        option: the option that named it, for the message.

    Returns:
        The path.

    Raises:
        OutputError: it is a file, or it cannot be created or written (one line, with the fix).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} ({option}): is a file where a folder is expected; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(
            f"{path} ({option}): a part of the path is a file where a folder is expected; pass another path"
        ) from None
    except OSError as e:
        raise OutputError(os_error_message(e, option)) from None
    _probe(path, option)
    return path


def check_writable_file(path: str | Path, option: str = "--out") -> Path:
    """Make sure the file ``path`` can be written (its folder created if missing); nothing is written to it.

    Args:
        path: the output file.
        option: the option that named it, for the message.

    Returns:
        The path.

    Raises:
        OutputError: it is a folder, or its folder cannot be created or written (one line, with the fix).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} ({option}): is a folder; pass a file path, e.g. {path / 'out'}{path.suffix}")
    check_writable_dir(path.parent, option)
    return path
