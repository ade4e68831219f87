"""The exceptions hierclass raises for bad input.

Every error a user can cause (a malformed CSV, a corrupt dump, a checkpoint made for
another taxonomy) is a :class:`HierclassError`. Its message is one line that names the
file, the place in it and the fix, so the CLI can print it as-is and exit 1.
"""

from __future__ import annotations

from pathlib import Path


class HierclassError(Exception):
    """Base class of every user-facing hierclass error."""


class TaxonomyError(HierclassError):
    """A taxonomy file is missing or malformed, or a category is not in the taxonomy."""


class DumpError(HierclassError):
    """A dump (BSON file or image catalogue) is missing, truncated or malformed."""


class CheckpointError(HierclassError):
    """A checkpoint is missing, malformed, or does not match the data it is used with."""


def where(path: str | Path, place: str | int | None = None) -> str:
    """Format a location as ``path`` or ``path:place`` for error messages."""
    return f"{path}" if place is None else f"{path}:{place}"


class OutputError(HierclassError):
    """An output path cannot be written (permissions, read-only or full disk, a file where a folder is expected)."""


class ConfigError(HierclassError, ValueError):
    """Training options that do not fit together or do not fit the features (e.g. L-BFGS for a CNN top)."""
