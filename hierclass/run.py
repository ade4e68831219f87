"""A run folder: one experiment's heads, the taxonomy they were trained with, and a manifest.

::

    RUN/category_names.csv   a copy of the taxonomy (so the run works from any directory)
    RUN/run.json             the manifest: the taxonomy's fingerprint, and per head how it was trained
    RUN/router/  RUN/experts/  RUN/flat/   one checkpoint each (hierclass.checkpoint)

This module imports neither torch nor numpy's heavy users; the command line uses it directly.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hierclass.atomic import atomic_open
from hierclass.errors import HierclassError
from hierclass.taxonomy import Taxonomy

TAXONOMY_FILE = "category_names.csv"
MANIFEST_FILE = "run.json"
HEADS = ("router", "experts", "flat")


class Run:
    """The folder of one experiment.

    Args:
        root: the run directory (created on the first head trained into it).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def head_dir(self, kind: str) -> Path:
        """Where the ``kind`` head's checkpoint lives."""
        if kind not in HEADS:
            raise ValueError(f"kind={kind!r}; expected one of {HEADS}")
        return self.root / kind

    @property
    def taxonomy_path(self) -> Path:
        return self.root / TAXONOMY_FILE

    def taxonomy(self) -> Taxonomy | None:
        """The taxonomy copied into the run, or None for a run that has none (made by an older version)."""
        return Taxonomy.from_csv(self.taxonomy_path) if self.taxonomy_path.is_file() else None

    def manifest(self) -> dict[str, Any]:
        """The manifest (empty for a new run)."""
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise HierclassError(f"{path}: unreadable run manifest ({e}); delete it and retrain, or fix it") from None

    def adopt_taxonomy(self, taxonomy: Taxonomy) -> None:
        """Copy ``taxonomy`` into the run, or check it is the one the run already holds.

        Raises:
            HierclassError: the run holds heads of another taxonomy.
        """
        have = self.taxonomy()
        if have is not None:
            if have.fingerprint != taxonomy.fingerprint:
                raise HierclassError(
                    f"{self.root}: this run holds heads of taxonomy {have.fingerprint} ({self.taxonomy_path}), "
                    f"not {taxonomy.fingerprint} ({taxonomy.source}); train into another run folder"
                )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.taxonomy_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["category_id", "category_level1", "category_level2", "category_level3"])
            writer.writerows((r.category_id, r.level1, r.level2, r.level3) for r in taxonomy.rows)
        self._update(lambda m: m.update(taxonomy={"file": TAXONOMY_FILE, "fingerprint": taxonomy.fingerprint}))

    def record_head(self, kind: str, entry: dict[str, Any]) -> None:
        """Note in the manifest how the ``kind`` head was trained (``entry``: JSON values)."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._update(lambda m: m.setdefault("heads", {}).__setitem__(kind, {"trained_at": stamp, **entry}))

    def _update(self, change: Any) -> None:
        manifest = self.manifest()
        change(manifest)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.root / MANIFEST_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.write("\n")
