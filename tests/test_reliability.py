"""Bad input through the long commands: nothing dropped without a word, no traceback.

Each test builds a small damaged dump (or a wrong taxonomy, an unwritable output) and checks
that the command names what it could not use in one line, and fails under ``--strict``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import shared_file
from test_report import write_taxonomy
from typer.testing import CliRunner

from hierclass.cli import app
from hierclass.data import open_source, synthetic_products, write_dump
from hierclass.errors import TaxonomyError
from hierclass.features import check_labels
from hierclass.taxonomy import Taxonomy

runner = CliRunner()
TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--engine", "torch", "--image-size", "32"]


def one_error_line(result) -> str:  # noqa: ANN001
    """The one error line of a failed command (progress bars on stderr aside)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stderr.count("error: ") == 1, result.stderr
    line = result.stderr.strip().replace("\r", "\n").splitlines()[-1]
    return line[line.index("error: ") :]


def _labelled_dump(path: Path, tax: Taxonomy, n: int = 12) -> list[tuple[int, int, list[bytes]]]:
    products = synthetic_products(n, n_categories=1, max_images=2)
    products = [(pid, int(tax.leaf_ids[i % tax.n_leaves]), jpegs) for i, (pid, _, jpegs) in enumerate(products)]
    write_dump(path, products)
    return products


def _break_length_prefix(path: Path, document: int) -> None:
    """Set the length prefix of the ``document``-th document to 3 (below the BSON minimum)."""
    data = bytearray(path.read_bytes())
    off = 0
    for _ in range(document):
        off += int.from_bytes(data[off : off + 4], "little")
    data[off : off + 4] = (3).to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, Path, list]:
    """A 12-product dump whose 5th document has a length prefix of 3."""
    tax_csv = write_taxonomy(tmp_path / "category_names.csv")
    dump = tmp_path / "damaged.bson"
    products = _labelled_dump(dump, Taxonomy.from_csv(tax_csv))
    _break_length_prefix(dump, 4)
    return tax_csv, dump, products


def test_extract_features_reports_a_damaged_dump(damaged: tuple[Path, Path, list], tmp_path: Path) -> None:
    """Before: exit 0 and "N images (N ok, 0 bad)", the products after the damage gone without a word."""
    tax_csv, dump, products = damaged
    args = ["extract-features", "--data", str(dump), "--taxonomy", str(tax_csv), *TINY]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert "length prefix 3 is below the BSON minimum" in warning and "recovered 7 good product(s)" in warning
    assert len(open_source(dump, progress=False)) == len(products) - 1  # only the damaged document is lost
    line = one_error_line(runner.invoke(app, [*args, "--out", str(tmp_path / "g"), "--strict"]))
    assert "length prefix 3 is below the BSON minimum" in line
    assert not (tmp_path / "g" / "meta.json").exists()


def test_extract_features_reports_missing_csv_files(tmp_path: Path) -> None:
    """Before: only `import` warned about the image files a CSV lists but that are not there."""
    tax_csv = write_taxonomy(tmp_path / "category_names.csv")
    (tmp_path / "a.jpg").write_bytes(synthetic_products(1)[0][2][0])
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("path,category_id\na.jpg,1000\ngone.jpg,1001\n")
    args = ["extract-features", "--data", str(catalogue), "--taxonomy", str(tax_csv), *TINY]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert "gone.jpg not found; 1 missing file(s) skipped" in result.stderr
    assert "not found" in one_error_line(runner.invoke(app, [*args, "--out", str(tmp_path / "g"), "--strict"]))


def test_predict_names_the_products_it_did_not_answer(damaged: tuple[Path, Path, list], tmp_path: Path) -> None:
    """Before: exit 0, "wrote 4 products" for a dump of 12, and not a word about the other 8."""
    from hierclass.engine import TrainConfig, train_head
    from hierclass.features import extract_features

    tax_csv, dump, products = damaged
    tax = Taxonomy.from_csv(tax_csv)
    good = tmp_path / "good.bson"
    write_dump(good, products)
    store = extract_features(good, tax, "test_efficientnet", "none", tmp_path / "feats", engine="torch",
                             image_size=32, progress=False)  # fmt: skip
    train_head(
        "flat", store, store, tax, TrainConfig(epochs=1, batch_size=8, progress=False), tmp_path / "run" / "flat"
    )
    out = tmp_path / "sub.csv"
    args = ["predict", "--run", str(tmp_path / "run"), "--model", "flat", "--data", str(dump), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    lost = products[4][0]
    assert [int(r["_id"]) for r in rows] == [p[0] for p in products if p[0] != lost]
    assert "could not be read and have no row in" in result.stderr
    assert "recovered 7 good product(s)" in result.stderr
    line = one_error_line(runner.invoke(app, [*args, "--strict", "--features-cache", str(tmp_path / "c2")]))
    assert "below the BSON minimum" in line


def test_wrong_taxonomy_stops_extraction(tmp_path: Path) -> None:
    """Before: every label -1, exit 0; the user found out only at training."""
    tax_csv = write_taxonomy(tmp_path / "category_names.csv")
    dump = tmp_path / "other.bson"
    write_dump(dump, synthetic_products(6, n_categories=3))  # category_ids 10, 11, 12: not in the taxonomy
    args = ["extract-features", "--data", str(dump), "--taxonomy", str(tax_csv), *TINY, "--out", str(tmp_path / "f")]
    line = one_error_line(runner.invoke(app, args))
    assert "is this the right taxonomy?" in line and "3 id(s): 10, 11, 12" in line
    assert not (tmp_path / "f" / "meta.json").exists()


def test_a_few_unknown_categories_are_named(tmp_path: Path) -> None:
    """A minority of unknown (or negative) category_ids: counted and named, kept as unlabelled."""
    tax = Taxonomy.from_csv(write_taxonomy(tmp_path / "category_names.csv"))
    ids = [1000, 1001, 1002, 77, -5, -1]  # -1: an unlabelled product, not counted
    message = check_labels(tax, ids, [2, 2, 2, 1, 1, 9], tmp_path / "d.bson")
    assert message is not None and "2 of 8 labelled image(s) (2 product(s))" in message and "-5, 77" in message
    assert check_labels(tax, [1000, -1], [1, 1], tmp_path / "d.bson") is None
    args = ["extract-features", "--taxonomy", str(tmp_path / "category_names.csv"), *TINY]
    dump = tmp_path / "mostly.bson"
    products = _labelled_dump(dump, tax, n=5)
    write_dump(dump, [*products, (5000, 77, products[0][2])])
    result = runner.invoke(app, [*args, "--data", str(dump), "--out", str(tmp_path / "f")])
    assert (
        result.exit_code == 0 and "category_id that is not a leaf" in result.stderr and "(1 id(s): 77)" in result.stderr
    )
    assert "not a leaf" in one_error_line(
        runner.invoke(app, [*args, "--data", str(dump), "--out", str(tmp_path / "g"), "--strict"])
    )


def test_cdiscount_sample_with_the_fashion_taxonomy_is_refused() -> None:
    """The real case: the Cdiscount sample with the Fashion taxonomy gave 110 labels of -1."""
    source = open_source(shared_file("cdiscount", "train_example.bson"), progress=False)
    fashion = Taxonomy.from_csv(shared_file("fashion", "category_names.csv"))
    with pytest.raises(TaxonomyError, match=r"110 of 110 labelled image\(s\).*is this the right taxonomy\?"):
        check_labels(fashion, source.category_ids, source.n_images, source.path)
