"""``hierclass index`` and ``hierclass import``."""

from __future__ import annotations

from pathlib import Path

import bson
from typer.testing import CliRunner

from hierclass.cli import app
from hierclass.data import make_jpeg, open_source, synthetic_products, write_dump

try:
    runner = CliRunner(mix_stderr=False)
except TypeError:  # click >= 8.2 always keeps stderr apart
    runner = CliRunner()


def test_index_real_sample(cdiscount_sample_bson: Path, cdiscount_taxonomy_csv: Path, tmp_path: Path) -> None:
    args = [
        "index",
        str(cdiscount_sample_bson),
        "--taxonomy",
        str(cdiscount_taxonomy_csv),
        "--cache-dir",
        str(tmp_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "products     82" in out and "images       110" in out and "categories   36 seen" in out
    assert "images/product  1: 67  2: 7  3: 3  4: 5" in out and "missing from taxonomy  0 categories" in out
    again = runner.invoke(app, args)
    assert "(reused)" in again.stdout


def test_index_bad_dump_warns_then_strict_fails(tmp_path: Path) -> None:
    dump = tmp_path / "d.bson"
    write_dump(dump, synthetic_products(3))
    extra = bson.encode({"_id": 9, "imgs": [{"picture": make_jpeg(9)}]})
    with dump.open("ab") as f:
        f.write(extra[:-10])
    offset = dump.stat().st_size - len(extra) + 10
    result = runner.invoke(app, ["index", str(dump), "--no-progress"])
    assert result.exit_code == 0
    assert "products     3" in result.stdout and f"{len(extra) - 10:,} bytes not indexed" in result.stdout
    assert result.stderr.startswith(f"warning: {dump}:{offset}: truncated document")

    result = runner.invoke(app, ["index", str(dump), "--strict", "--no-progress"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {dump}:{offset}: truncated document")


def test_index_unknown_categories(tmp_path: Path) -> None:
    dump = tmp_path / "d.bson"
    write_dump(dump, synthetic_products(4, n_categories=2))  # categories 10 and 11
    tax = tmp_path / "tax.csv"
    tax.write_text("category_id,category_level1,category_level2,category_level3\n10,A,a,x\n")
    result = runner.invoke(app, ["index", str(dump), "--taxonomy", str(tax), "--no-progress"])
    assert result.exit_code == 0
    assert "missing from taxonomy  1 categories, 2 products" in result.stdout
    assert "category_id 11 is not in" in result.stderr
    result = runner.invoke(app, ["index", str(dump), "--taxonomy", str(tax), "--strict", "--no-progress"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1


def test_index_missing_dump(tmp_path: Path) -> None:
    result = runner.invoke(app, ["index", str(tmp_path / "nope.bson")])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "not found" in result.stderr


def test_import_folder(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cid, k in [(5, 1), (5, 2), (6, 3)]:
        (root / str(cid)).mkdir(parents=True, exist_ok=True)
        (root / str(cid) / f"{k}.jpg").write_bytes(make_jpeg(k))
    out = tmp_path / "out.bson"
    result = runner.invoke(app, ["import", str(root), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 products, 3 images" in result.stdout
    dump = open_source(out, progress=False)
    assert dump.category_ids.tolist() == [5, 5, 6] and dump.read_images(2) == [make_jpeg(3)]
    bad = runner.invoke(app, ["import", str(tmp_path / "none"), "--out", str(out)])
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1
