"""``hierclass index``, ``import`` and ``split``."""

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
    assert result.stderr.startswith(f"error: {dump}:") and "category_id 11 is not in" in result.stderr


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
    assert bad.stderr.startswith(f"error: {tmp_path / 'none'}: not found; pass a .bson dump")


def test_import_csv_with_skus_keeps_them(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / f"{k}.jpg").write_bytes(make_jpeg(k))
    csv = tmp_path / "cat.csv"
    csv.write_text("path,category_id,product_id\n0.jpg,5,train-101-0\n1.jpg,6,train-7\n2.jpg,5,train-101-0\n")
    out = tmp_path / "out.bson"
    result = runner.invoke(app, ["import", str(csv), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "2 products, 3 images" in result.stdout
    docs = bson.decode_all(out.read_bytes())
    assert [(d["_id"], d["category_id"], d["sku"], len(d["imgs"])) for d in docs] == [
        (0, 5, "train-101-0", 2),
        (1, 6, "train-7", 1),
    ]
    dump = open_source(out, cache_dir=tmp_path / "idx", progress=False)
    assert dump.product_ids.tolist() == [0, 1] and dump.read_images(0) == [make_jpeg(0), make_jpeg(2)]


def _write_names_taxonomy(path: Path) -> Path:
    path.write_text(
        "category_id,category_level1,category_level2,category_level3\n"
        "10,A,a,SHOES\n11,A,a,BOOTS\n12,B,b,HATS\n13,B,c,HATS\n"
    )
    return path


def test_import_folders_named_by_category(tmp_path: Path) -> None:
    tax = _write_names_taxonomy(tmp_path / "tax.csv")
    root = tmp_path / "imgs"
    for name, k in [("SHOES", 1), ("BOOTS", 2), ("BOOTS", 3), ("12", 4)]:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{k}.jpg").write_bytes(make_jpeg(k))
    out = tmp_path / "out.bson"
    result = runner.invoke(app, ["import", str(root), "--out", str(out), "--taxonomy", str(tax), "--no-progress"])
    assert result.exit_code == 0, result.output
    dump = open_source(out, cache_dir=tmp_path / "idx", progress=False)
    assert dump.category_ids.tolist() == [10, 11, 11, 12] and dump.read_images(0) == [make_jpeg(1)]

    no_tax = runner.invoke(app, ["import", str(root), "--out", str(out), "--no-progress"])
    assert no_tax.exit_code == 1 and "folder name 'BOOTS' is not a category_id" in no_tax.stderr
    assert "pass --taxonomy" in no_tax.stderr
    (root / "HATS").mkdir()
    twice = runner.invoke(app, ["import", str(root), "--out", str(out), "--taxonomy", str(tax), "--no-progress"])
    assert twice.exit_code == 1 and "2 leaves of" in twice.stderr and "'HATS' (category_id 12, 13)" in twice.stderr
    (root / "HATS").rmdir()
    (root / "SHOE").mkdir()
    typo = runner.invoke(app, ["import", str(root), "--out", str(out), "--taxonomy", str(tax), "--no-progress"])
    assert typo.exit_code == 1 and "no leaf of" in typo.stderr and "(close: 'SHOES')" in typo.stderr


def test_split_stratified_by_leaf_and_byte_exact(tmp_path: Path) -> None:
    dump = tmp_path / "all.bson"
    write_dump(dump, synthetic_products(60, n_categories=3))  # 20 products per category
    out = tmp_path / "split"
    args = [
        "split",
        str(dump),
        "--val-fraction",
        "0.25",
        "--seed",
        "3",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path),
    ]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --no-progress: no bar
    docs = {name: bson.decode_all((out / f"{name}.bson").read_bytes()) for name in ("train", "val")}
    train_ids, val_ids = ({d["_id"] for d in docs[n]} for n in ("train", "val"))
    assert not train_ids & val_ids and len(train_ids | val_ids) == 60
    assert sorted(d["category_id"] for d in docs["val"]) == [10] * 5 + [11] * 5 + [12] * 5
    assert f"val    {out / 'val.bson'}: 15 products" in result.stdout
    originals = {d["_id"]: bson.encode(d) for d in bson.decode_all(dump.read_bytes())}
    assert all(bson.encode(d) == originals[d["_id"]] for d in docs["val"] + docs["train"])
    first = (out / "val.bson").read_bytes()
    again = runner.invoke(app, [*args, "--progress"])
    assert again.exit_code == 0 and (out / "val.bson").read_bytes() == first  # same seed, same split
    assert "split" in again.stderr  # the bar goes to stderr


def test_split_bad_fraction(tmp_path: Path) -> None:
    dump = tmp_path / "all.bson"
    write_dump(dump, synthetic_products(4))
    args = ["split", str(dump), "--out", str(tmp_path / "o"), "--val-fraction"]
    result = runner.invoke(app, [*args, "1"])
    assert result.exit_code == 1 and result.stderr == (
        "error: --val-fraction 1 keeps no products for training; give a value in [0, 1)\n"
    )
    result = runner.invoke(app, [*args, "2"])
    assert result.exit_code == 2 and "Invalid value" in result.output and not (tmp_path / "o").exists()


def test_split_refuses_other_inputs_and_overwriting(tmp_path: Path) -> None:
    result = runner.invoke(app, ["split", str(tmp_path / "x.csv"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "not a .bson dump" in result.stderr
    dump = tmp_path / "train.bson"
    write_dump(dump, synthetic_products(4))
    result = runner.invoke(app, ["split", str(dump), "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 1 and "would overwrite the dump it reads" in result.stderr
