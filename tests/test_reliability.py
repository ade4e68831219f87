"""Bad input through the long commands: nothing dropped without a word, no traceback.

Each test builds a small damaged dump (or a wrong taxonomy, an unwritable output) and checks
that the command names what it could not use in one line, and fails under ``--strict``.
"""

from __future__ import annotations

import csv
import json
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


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """A flat head trained (one epoch) on features of a tiny random backbone: (taxonomy csv, run dir, products)."""
    from hierclass.engine import TrainConfig, train_head
    from hierclass.features import extract_features

    root = tmp_path_factory.mktemp("flat_run")
    tax_csv = write_taxonomy(root / "category_names.csv")
    tax = Taxonomy.from_csv(tax_csv)
    products = _labelled_dump(root / "good.bson", tax)
    store = extract_features(root / "good.bson", tax, "test_efficientnet", "none", root / "feats", engine="torch",
                             image_size=32, progress=False)  # fmt: skip
    train_head("flat", store, store, tax, TrainConfig(epochs=1, batch_size=8, progress=False), root / "run" / "flat")
    return tax_csv, root / "run", products


def test_predict_names_the_products_it_did_not_answer(flat_run: tuple[Path, Path, list], tmp_path: Path) -> None:
    """Before: exit 0, "wrote 4 products" for a dump of 12, and not a word about the other 8."""
    _, run_dir, products = flat_run
    dump = tmp_path / "damaged.bson"
    write_dump(dump, products)
    _break_length_prefix(dump, 4)
    out = tmp_path / "sub.csv"
    args = ["predict", "--run", str(run_dir), "--model", "flat", "--data", str(dump), "--out", str(out)]
    result = runner.invoke(app, [*args, "--features-cache", str(tmp_path / "c1")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    lost = products[4][0]
    assert [int(r["_id"]) for r in rows] == [p[0] for p in products if p[0] != lost]
    assert "could not be read and have no row in" in result.stderr
    assert "recovered 7 good product(s)" in result.stderr
    line = one_error_line(runner.invoke(app, [*args, "--strict", "--features-cache", str(tmp_path / "c2")]))
    assert "below the BSON minimum" in line


def test_predict_on_a_dump_without_a_valid_image(flat_run: tuple[Path, Path, list], tmp_path: Path) -> None:
    """Before: a traceback once every image had failed to decode."""
    _, run_dir, _ = flat_run
    dump = tmp_path / "bad.bson"
    write_dump(dump, [(1, 1000, [b"not a jpeg"]), (2, 1001, [b"\xff\xd8 nor this"])])
    args = ["predict", "--run", str(run_dir), "--data", str(dump), "--out", str(tmp_path / "s.csv"), "--model", "flat"]
    assert "none of its 2 image(s) could be decoded" in one_error_line(runner.invoke(app, args))


def test_predict_flat_ignores_an_unfinished_experts_folder(flat_run: tuple[Path, Path, list], tmp_path: Path) -> None:
    """Before: an experts/ folder left by a killed first train-experts blocked even --model flat."""
    import shutil

    _, run_dir, products = flat_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "experts").mkdir()
    dump = tmp_path / "good.bson"
    write_dump(dump, products)
    out = tmp_path / "s.csv"
    result = runner.invoke(
        app, ["predict", "--run", str(run), "--data", str(dump), "--out", str(out), "--model", "flat"]
    )
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader(out.open()))) == len(products)


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


def test_a_damaged_index_file_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    """Before: a cut index file gave a zipfile.BadZipFile traceback until the user deleted it."""
    dump = tmp_path / "d.bson"
    write_dump(dump, synthetic_products(5))
    assert open_source(dump, progress=False).problems() == []
    index_file = tmp_path / "d.bson.idx.npz"
    data = index_file.read_bytes()
    index_file.write_bytes(data[: len(data) // 2])
    source = open_source(dump, progress=False)
    assert len(source) == 5 and not source.report.reused
    (line,) = source.problems()
    assert line.startswith(f"{index_file}: damaged index file") and "built the index again" in line
    assert open_source(dump, progress=False).report.reused  # the rebuilt file is good


def test_an_index_that_does_not_match_its_dump_is_rebuilt(tmp_path: Path) -> None:
    """Before: a tampered index was reused; reading said "open it again", and reopening reused it again."""
    from hierclass.data.bson_index import _stamp, build_index, save_index

    dump = tmp_path / "d.bson"
    write_dump(dump, synthetic_products(5))
    index = build_index(dump, progress=False)
    index.offset = index.offset + 1  # every offset points one byte past its document
    save_index(index, dump, tmp_path / "d.bson.idx.npz", _stamp(dump))
    source = open_source(dump, progress=False)
    assert not source.report.reused and "does not match" in source.problems()[0]
    assert [d["_id"] for d in (source.read_document(p) for p in range(len(source)))] == [1000, 1001, 1002, 1003, 1004]


def test_repeated_ids_are_reported(tmp_path: Path) -> None:
    """Before: not detected; predict wrote two rows for one _id (Kaggle rejects the file)."""
    products = synthetic_products(4)
    dump = tmp_path / "d.bson"
    write_dump(dump, [*products, (products[1][0], 11, products[1][2])])
    source = open_source(dump, progress=False)
    r = source.report
    assert (r.n_duplicate_ids, r.first_duplicate_id) == (1, products[1][0]) and not r.ok
    assert f"_id {products[1][0]} appears again" in source.problems()[0]
    result = runner.invoke(app, ["index", str(dump), "--strict", "--no-progress"])
    assert "appears again" in one_error_line(result)


def _twin_dump(path: Path, products: list) -> tuple[int, int]:
    """``products`` plus a last product of another category and images that reuses the ``_id`` of
    the second: ``(that _id, the twin's category_id)``."""
    twin = (products[1][0], products[7][1], products[7][2])
    write_dump(path, [*products, twin])
    return twin[0], twin[1]


def test_evaluate_keeps_products_that_share_an_id_apart(flat_run: tuple[Path, Path, list], tmp_path: Path) -> None:
    """Before: the two products of one _id (two categories) were scored as one product, with the
    first one's label and the images of both: 12 products for a dump of 13."""
    _, run_dir, products = flat_run
    dump = tmp_path / "twins.bson"
    _twin_dump(dump, products)
    out = tmp_path / "report"
    args = ["evaluate", "--run", str(run_dir), "--data", str(dump), "--out", str(out), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "appears again" in result.stderr  # the index's warning
    report = json.loads((out / "report.json").read_text())
    n_images = sum(len(p[2]) for p in products) + len(products[7][2])
    assert (report["flat"]["n_products"], report["flat"]["n_images"]) == (len(products) + 1, n_images)


def test_predict_writes_one_row_per_id(flat_run: tuple[Path, Path, list], tmp_path: Path) -> None:
    """Before: two rows for the repeated _id (Kaggle rejects the file), both the mean over the
    images of the two products, and not a word."""
    _, run_dir, products = flat_run
    good, twins = tmp_path / "good.bson", tmp_path / "twins.bson"
    write_dump(good, products)
    repeated, _ = _twin_dump(twins, products)
    args = ["predict", "--run", str(run_dir), "--model", "flat", "--topk", "1", "--no-progress"]
    rows = {}
    for dump in (good, twins):
        out = tmp_path / f"{dump.stem}.csv"
        result = runner.invoke(app, [*args, "--data", str(dump), "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows[dump.stem] = list(csv.DictReader(out.open()))
    assert [int(r["_id"]) for r in rows["twins"]] == [p[0] for p in products]  # one row per _id
    for a, b in zip(rows["twins"], rows["good"], strict=True):  # the first product's prediction, its own
        assert (a["_id"], a["category_id"]) == (b["_id"], b["category_id"])
        assert float(a["top1_prob"]) == pytest.approx(float(b["top1_prob"]), abs=1e-4)
    (warning,) = [line for line in result.stderr.splitlines() if "repeat the _id" in line]
    assert f"1 product(s) repeat the _id of an earlier one (_id {repeated})" in warning
    assert "one row per _id" in warning
    strict = runner.invoke(app, [*args, "--data", str(twins), "--out", str(tmp_path / "s.csv"), "--strict",
                                 "--features-cache", str(tmp_path / "c")])  # fmt: skip
    assert f"_id {repeated} appears again" in one_error_line(strict)


def test_predict_features_of_products_sharing_an_id(flat_run: tuple[Path, Path, list], tmp_path: Path) -> None:
    """``predict --features`` too: one row per _id, with a warning."""
    tax_csv, run_dir, products = flat_run
    dump = tmp_path / "twins.bson"
    repeated, _ = _twin_dump(dump, products)
    feats = tmp_path / "f"
    extract = ["extract-features", "--data", str(dump), "--taxonomy", str(tax_csv), *TINY, "--out", str(feats)]
    assert runner.invoke(app, extract).exit_code == 0
    out = tmp_path / "s.csv"
    args = ["predict", "--run", str(run_dir), "--model", "flat", "--features", str(feats), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [int(r["_id"]) for r in csv.DictReader(out.open())] == [p[0] for p in products]
    assert f"(_id {repeated})" in result.stderr


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 40], ids=["empty", "random-bytes"])
def test_a_dump_without_products_fails(tmp_path: Path, content: bytes) -> None:
    """Before: `index` and `extract-features` exited 0 on an empty or random-bytes .bson."""
    dump = tmp_path / "d.bson"
    dump.write_bytes(content)
    assert "no product with an image found" in one_error_line(runner.invoke(app, ["index", str(dump), "--no-progress"]))
    tax_csv = write_taxonomy(tmp_path / "category_names.csv")
    args = ["extract-features", "--data", str(dump), "--taxonomy", str(tax_csv), *TINY, "--out", str(tmp_path / "f")]
    assert "no product with an image found" in one_error_line(runner.invoke(app, args))
