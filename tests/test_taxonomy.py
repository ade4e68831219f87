from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hierclass import Taxonomy, TaxonomyError

HEADER = "category_id,category_level1,category_level2,category_level3\n"
SMALL = HEADER + "30,B,B1,z\n" + "10,A,A1,x\n" + "11,A,A1,y\n" + "12,A,A2,x\n" + "20,B,B2,w\n" + "40,C,C1,only\n"


def write(tmp_path: Path, text: str, name: str = "cats.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


@pytest.fixture
def small(tmp_path: Path) -> Taxonomy:
    return Taxonomy.from_csv(write(tmp_path, SMALL))


def test_real_cdiscount_counts(cdiscount_taxonomy_csv: Path) -> None:
    tax = Taxonomy.from_csv(cdiscount_taxonomy_csv)
    s = tax.stats()
    assert (tax.n_level1, tax.n_level2, tax.n_leaves) == (49, 486, 5270)
    assert s["level2_distinct_names"] == 483
    assert s["leaf_distinct_names"] == 5263
    # every leaf index round-trips through its category_id and its branch-local index
    assert np.array_equal(tax.encode(tax.leaf_ids), np.arange(5270))
    for b in range(tax.n_level1):
        leaves = tax.branch_leaves(b)
        assert np.all(tax.leaf_level1[leaves] == b)
        assert np.array_equal(tax.leaf_local[leaves], np.arange(len(leaves)))
    names = tax.leaf_names + tax.level1_names + [p[1] for p in tax.level2_paths]
    assert any("Œ" in name for name in names)  # UTF-8 names load as text


def test_canonical_order_and_branch_ranges(small: Taxonomy) -> None:
    assert small.level1_names == ["A", "B", "C"]
    assert small.level2_paths == [("A", "A1"), ("A", "A2"), ("B", "B1"), ("B", "B2"), ("C", "C1")]
    assert small.leaf_ids.tolist() == [10, 11, 12, 30, 20, 40]
    assert small.branch_start.tolist() == [0, 3, 5, 6]
    assert small.branch_sizes.tolist() == [3, 2, 1]
    assert small.leaf_local.tolist() == [0, 1, 2, 0, 1, 0]
    assert small.leaf_level2.tolist() == [0, 0, 1, 2, 3, 4]
    assert small.local_to_leaf(1, 1) == 4 and small.leaf_ids[4] == 20
    with pytest.raises(IndexError):
        small.local_to_leaf(1, 2)


def test_order_and_fingerprint_ignore_row_order(tmp_path: Path, small: Taxonomy) -> None:
    lines = SMALL.splitlines(keepends=True)
    shuffled = Taxonomy.from_csv(write(tmp_path, lines[0] + "".join(reversed(lines[1:])), "b.csv"))
    assert shuffled.leaf_ids.tolist() == small.leaf_ids.tolist()
    assert shuffled.fingerprint == small.fingerprint
    renamed = Taxonomy.from_csv(write(tmp_path, SMALL.replace("only", "alone"), "c.csv"))
    assert renamed.fingerprint != small.fingerprint


def test_tree_distance(small: Taxonomy) -> None:
    i = small.encode([10, 10, 11, 12, 30, 40])
    j = small.encode([10, 11, 10, 10, 10, 30])
    assert small.tree_distance(i, j).tolist() == [0, 1, 1, 2, 3, 3]


def test_encode_unknown(small: Taxonomy) -> None:
    assert small.encode([40, 99, 10], unknown=-1).tolist() == [5, -1, 0]
    with pytest.raises(TaxonomyError, match="category_id 99 is not in the taxonomy"):
        small.encode([40, 99])
    with pytest.raises(TaxonomyError, match="no level-1 branch named 'Z'"):
        small.branch_index("Z")


def test_bom_and_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "1,FŒTAL,É,ü\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    tax = Taxonomy.from_csv(path)
    assert tax.leaf_path(0) == ("FŒTAL", "É", "ü")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", r"cats\.csv:1: the file is empty"),
        (
            "id,category_level1,category_level2,category_level3\n1,a,b,c\n",
            r"cats\.csv:1: missing column\(s\) category_id",
        ),
        ("category_id,category_level1,category_level3\n1,a,c\n", r"missing column\(s\) category_level2"),
        (HEADER + "1,a,b,c\n2,a,b,d\n1,a,b,e\n", r"cats\.csv:4: duplicate category_id 1 \(first at 2\)"),
        (HEADER + "1,a,b,c\nx7,a,b,d\n", r"cats\.csv:3: category_id 'x7' is not an integer"),
        (HEADER + "1,a,,c\n", r"cats\.csv:2: empty category_level2 for category_id 1"),
        (HEADER + "1,a,b\n", r"cats\.csv:2: 3 field\(s\) where the header has 4"),
        (HEADER, r"the taxonomy has no categories"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(TaxonomyError, match=pattern):
        Taxonomy.from_csv(write(tmp_path, text))


def test_missing_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match="taxonomy file not found"):
        Taxonomy.from_csv(tmp_path / "nope.csv")
    path = tmp_path / "latin1.csv"
    path.write_bytes((HEADER + "1,FŒTAL,b,c\n").encode("cp1252"))
    with pytest.raises(TaxonomyError, match="not UTF-8"):
        Taxonomy.from_csv(path)


def test_an_unbalanced_quote_is_reported_where_it_opens(tmp_path: Path) -> None:
    """Before: reported at the last line of the file (where the runaway field ended), not where the quote opened."""
    lines = ["category_id,category_level1,category_level2,category_level3"]
    lines += [f"{i},A,B,C{i}" for i in range(1, 5)] + ['5,A,"B,C5'] + [f"{i},A,B,C{i}" for i in range(6, 111)]
    path = tmp_path / "q.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaxonomyError, match=rf"^{path}:6: a quote opened on this line is not closed"):
        Taxonomy.from_csv(path)


def test_semicolon_separated_csv_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("category_id;category_level1;category_level2;category_level3\n1;a;b;c\n")
    with pytest.raises(
        TaxonomyError, match=rf"^{path}:1: the columns are separated by semicolons; save the file with commas"
    ):
        Taxonomy.from_csv(path)
