"""The category tree: level 1 -> level 2 -> leaf, and the one source of class indices.

Every class index used anywhere in hierclass (router outputs, expert outputs, flat
outputs, feature-cache labels, report tables) comes from a :class:`Taxonomy`. The order
is canonical and independent of the row order of the CSV file:

* level-1 branches are sorted by name;
* level-2 nodes are sorted by their ``(level1, level2)`` path (a level-2 name that occurs
  under two parents is two nodes, as in Cdiscount's real taxonomy);
* leaves are sorted by ``(level1, level2, level3, category_id)``, so the leaves of one
  branch form a contiguous range of leaf indices: branch ``b`` owns leaf indices
  ``branch_start[b] : branch_start[b + 1]`` and a leaf's branch-local index (what the
  branch's expert predicts) is its leaf index minus ``branch_start[b]``.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hierclass.errors import TaxonomyError

COLUMNS = ("category_id", "category_level1", "category_level2", "category_level3")
"""The columns of Cdiscount's ``category_names.csv``, in order."""


@dataclass(frozen=True)
class Row:
    """One line of a taxonomy file: a leaf and its path."""

    category_id: int
    level1: str
    level2: str
    level3: str


class Taxonomy:
    """A three-level category tree with canonical indices for every level.

    Build it with :meth:`from_csv` (a Cdiscount ``category_names.csv``) or
    :meth:`from_rows`. All arrays are read-only numpy arrays indexed by leaf index,
    level-2 node index or branch (level-1) index.

    Attributes:
        source: where the taxonomy came from (a path or a label), for messages.
        level1_names: the level-1 branch names, in branch-index order.
        level2_paths: the ``(level1, level2)`` path of each level-2 node.
        leaf_ids: the category_id of each leaf (int64), in leaf-index order.
        leaf_names: the level-3 name of each leaf.
        leaf_level1: the branch index of each leaf.
        leaf_level2: the level-2 node index of each leaf.
        leaf_local: each leaf's index inside its branch (what the expert predicts).
        level2_level1: the branch index of each level-2 node.
        branch_start: ``n_level1 + 1`` offsets; branch ``b`` owns leaves
            ``branch_start[b]:branch_start[b + 1]``.
        fingerprint: a stable hash of the sorted rows; models refuse another taxonomy.
    """

    def __init__(self, rows: Sequence[Row], source: str = "<rows>") -> None:
        if not rows:
            raise TaxonomyError(f"{source}: the taxonomy has no categories; give a file with at least one row")
        self.source = source
        ordered = sorted(rows, key=lambda r: (r.level1, r.level2, r.level3, r.category_id))
        self._rows = tuple(ordered)
        self.level1_names: list[str] = sorted({r.level1 for r in ordered})
        self.level2_paths: list[tuple[str, str]] = sorted({(r.level1, r.level2) for r in ordered})
        l1_index = {name: i for i, name in enumerate(self.level1_names)}
        l2_index = {path: i for i, path in enumerate(self.level2_paths)}

        self.leaf_ids = _frozen(np.array([r.category_id for r in ordered], dtype=np.int64))
        self.leaf_names: list[str] = [r.level3 for r in ordered]
        self.leaf_level1 = _frozen(np.array([l1_index[r.level1] for r in ordered], dtype=np.int64))
        self.leaf_level2 = _frozen(np.array([l2_index[(r.level1, r.level2)] for r in ordered], dtype=np.int64))
        self.level2_level1 = _frozen(np.array([l1_index[l1] for l1, _ in self.level2_paths], dtype=np.int64))
        counts = np.bincount(self.leaf_level1, minlength=len(self.level1_names))
        self.branch_start = _frozen(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        self.leaf_local = _frozen(np.arange(len(ordered), dtype=np.int64) - self.branch_start[self.leaf_level1])
        self._leaf_of_id = {int(cid): i for i, cid in enumerate(self.leaf_ids)}
        self._id_order = np.argsort(self.leaf_ids, kind="stable")  # for vectorised encode()
        self._sorted_ids = self.leaf_ids[self._id_order]
        self._branch_of_name = l1_index
        digest = hashlib.sha256()
        for r in sorted(ordered, key=lambda r: r.category_id):
            digest.update(f"{r.category_id}\t{r.level1}\t{r.level2}\t{r.level3}\n".encode())
        self.fingerprint: str = digest.hexdigest()[:16]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_csv(cls, path: str | Path) -> Taxonomy:
        """Load a Cdiscount-style ``category_names.csv``.

        The file needs the header ``category_id,category_level1,category_level2,
        category_level3`` (extra columns are ignored), one leaf per line, UTF-8 with or
        without a byte-order mark.

        Raises:
            TaxonomyError: the file is missing or malformed; the message names the file,
                the line and the fix.
        """
        path = Path(path)
        if not path.is_file():
            raise TaxonomyError(
                f"{path}: taxonomy file not found; pass the path of a category_names.csv "
                "(Cdiscount's is on the competition's data page)"
            )
        try:
            with path.open(encoding="utf-8-sig", newline="") as f:
                lines, rows = _read_rows(csv.reader(f), str(path))
                return cls.from_rows(rows, source=str(path), lines=lines)
        except UnicodeDecodeError as e:
            raise TaxonomyError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from e
        except csv.Error as e:
            raise TaxonomyError(f"{path}: malformed CSV ({e}); fix the quoting of that line") from e

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Row | tuple[int, str, str, str]],
        source: str = "<rows>",
        lines: Sequence[int] | None = None,
    ) -> Taxonomy:
        """Build a taxonomy from rows ``(category_id, level1, level2, level3)``.

        Args:
            rows: the leaves.
            source: a path or label for messages.
            lines: the file line of each row, for messages (default: row numbers).

        Raises:
            TaxonomyError: a duplicate category_id or an empty name.
        """
        seen: dict[int, int] = {}
        checked: list[Row] = []
        for n, row in enumerate(rows, start=1):
            row = row if isinstance(row, Row) else Row(int(row[0]), *map(str, row[1:4]))
            place = lines[n - 1] if lines is not None else n
            if row.category_id in seen:
                raise TaxonomyError(
                    f"{source}:{place}: duplicate category_id {row.category_id} (first at {seen[row.category_id]}); "
                    "keep one row per category_id"
                )
            seen[row.category_id] = place
            checked.append(row)
        return cls(checked, source=source)

    # ------------------------------------------------------------------ sizes
    @property
    def n_leaves(self) -> int:
        """The number of leaf categories."""
        return len(self.leaf_ids)

    @property
    def n_level1(self) -> int:
        """The number of level-1 branches (the router's classes)."""
        return len(self.level1_names)

    @property
    def n_level2(self) -> int:
        """The number of level-2 nodes, counted by (level1, level2) path."""
        return len(self.level2_paths)

    @property
    def branch_sizes(self) -> np.ndarray:
        """The number of leaves in each branch."""
        return np.diff(self.branch_start)

    @property
    def rows(self) -> tuple[Row, ...]:
        """The rows in leaf-index order."""
        return self._rows

    # ------------------------------------------------------------------ lookups
    def leaf_index(self, category_id: int) -> int:
        """The leaf index of one category_id.

        Raises:
            TaxonomyError: the category_id is not in this taxonomy.
        """
        try:
            return self._leaf_of_id[int(category_id)]
        except KeyError:
            raise TaxonomyError(
                f"{self.source}: category_id {category_id} is not in the taxonomy; "
                "use the category_names.csv the data was labelled with"
            ) from None

    def encode(self, category_ids: Iterable[int] | np.ndarray, unknown: int | None = None) -> np.ndarray:
        """Map category_ids to leaf indices.

        Args:
            category_ids: the ids to map.
            unknown: the index to give ids missing from the taxonomy; ``None`` raises.

        Raises:
            TaxonomyError: an id is missing and ``unknown`` is None.
        """
        ids = np.asarray(category_ids if isinstance(category_ids, np.ndarray) else list(category_ids), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), self.n_leaves - 1)
        found = self._sorted_ids[pos] == ids
        if not found.all() and unknown is None:
            self.leaf_index(int(ids[~found][0]))  # raises with the standard message
        return np.where(found, self._id_order[pos], -1 if unknown is None else unknown).astype(np.int64)

    def branch_index(self, name: str) -> int:
        """The index of the level-1 branch called ``name``.

        Raises:
            TaxonomyError: no branch has that name.
        """
        try:
            return self._branch_of_name[name]
        except KeyError:
            close = [n for n in self.level1_names if name.lower() in n.lower()][:3]
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see `hierclass taxonomy show`"
            raise TaxonomyError(f"{self.source}: no level-1 branch named {name!r}{hint}") from None

    def branch_leaves(self, branch: int) -> np.ndarray:
        """The global leaf indices of a branch, in branch-local order."""
        return np.arange(self.branch_start[branch], self.branch_start[branch + 1], dtype=np.int64)

    def local_to_leaf(self, branch: int, local: int | np.ndarray) -> int | np.ndarray:
        """Map a branch-local index (an expert's output) back to the global leaf index."""
        size = int(self.branch_sizes[branch])
        if np.any(np.asarray(local) < 0) or np.any(np.asarray(local) >= size):
            raise IndexError(f"branch {branch} has {size} leaves; local index {local} is out of range")
        return self.branch_start[branch] + local

    def leaf_path(self, leaf: int) -> tuple[str, str, str]:
        """The (level1, level2, level3) names of a leaf."""
        r = self._rows[leaf]
        return r.level1, r.level2, r.level3

    def tree_distance(self, a: int | np.ndarray, b: int | np.ndarray) -> np.ndarray:
        """Tree distance between leaves: 0 same leaf, 1 same level-2, 2 same level-1, 3 otherwise.

        Works element-wise on arrays of leaf indices.
        """
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        same_l1 = self.leaf_level1[a] == self.leaf_level1[b]
        same_l2 = self.leaf_level2[a] == self.leaf_level2[b]
        return np.where(a == b, 0, np.where(same_l2, 1, np.where(same_l1, 2, 3))).astype(np.int64)

    def stats(self) -> dict[str, object]:
        """Counts per level and leaves-per-branch min / median / max."""
        sizes = self.branch_sizes
        return {
            "level1": self.n_level1,
            "level2": self.n_level2,
            "level2_distinct_names": len({l2 for _, l2 in self.level2_paths}),
            "leaves": self.n_leaves,
            "leaf_distinct_names": len(set(self.leaf_names)),
            "leaves_per_branch_min": int(sizes.min()),
            "leaves_per_branch_median": float(np.median(sizes)),
            "leaves_per_branch_max": int(sizes.max()),
            "single_leaf_branches": int((sizes == 1).sum()),
            "fingerprint": self.fingerprint,
        }

    def __len__(self) -> int:
        return self.n_leaves

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return (
            f"Taxonomy({self.source!r}: {self.n_level1} level-1, {self.n_level2} level-2, "
            f"{self.n_leaves} leaves, fingerprint {self.fingerprint})"
        )


def _read_rows(reader: csv._reader, path: str) -> tuple[list[int], list[Row]]:
    """Parse and validate the lines of a taxonomy CSV; return each row's line and the rows."""
    header = next(reader, None)
    if header is None:
        raise TaxonomyError(f"{path}:1: the file is empty; it needs the header {','.join(COLUMNS)}")
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing and len(header) == 1 and ";" in header[0]:
        raise TaxonomyError(
            f"{path}:1: the columns are separated by semicolons; save the file with commas "
            f"(the header must be {','.join(COLUMNS)})"
        )
    if missing:
        raise TaxonomyError(
            f"{path}:1: missing column(s) {', '.join(missing)} (found {', '.join(header) or 'none'}); "
            f"the header must name {','.join(COLUMNS)}"
        )
    cols = [header.index(c) for c in COLUMNS]
    rows: list[Row] = []
    lines: list[int] = []
    while True:
        start = reader.line_num + 1  # where this row begins (a quoted field may span lines)
        try:
            fields = next(reader, None)
        except csv.Error as e:
            raise TaxonomyError(
                f"{path}:{start}: malformed CSV ({e}); a quote opened on this line is not closed, close it"
            ) from None
        if fields is None:
            break
        line = reader.line_num
        if line > start and any("\n" in f or "\r" in f for f in fields):
            raise TaxonomyError(
                f"{path}:{start}: a quote opened on this line is not closed (the field runs on to line {line}); "
                "close it, or remove it"
            )
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) < len(header):
            raise TaxonomyError(
                f"{path}:{line}: {len(fields)} field(s) where the header has {len(header)}; "
                "quote names that contain commas"
            )
        # Names are kept exactly as written: the real file has names that differ only by spaces.
        raw_id, l1, l2, l3 = (fields[c] for c in cols)
        try:
            cid = int(raw_id.strip())
        except ValueError:
            raise TaxonomyError(f"{path}:{line}: category_id {raw_id!r} is not an integer; fix that line") from None
        for col, value in zip(COLUMNS[1:], (l1, l2, l3), strict=True):
            if not value.strip():
                raise TaxonomyError(f"{path}:{line}: empty {col} for category_id {cid}; give every level a name")
        rows.append(Row(cid, l1, l2, l3))
        lines.append(line)
    return lines, rows


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a
