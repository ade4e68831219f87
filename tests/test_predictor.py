"""Predictions on plain image files and bytes: Run.predict_images and ``predict --data`` on images."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from test_report import write_taxonomy
from typer.testing import CliRunner

from hierclass.cli import app
from hierclass.data import open_source, synthetic_products, write_dump
from hierclass.engine import KINDS, TrainConfig, train_head
from hierclass.features import extract_features
from hierclass.run import Run
from hierclass.taxonomy import Taxonomy

runner = CliRunner()
_RUNS: dict[Path, tuple[Path, Path, Path]] = {}


def image_run(factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny run whose heads read features of a real (random, seeded) backbone, once per test session.

    Returns:
        ``(run dir, the dump its features came from, a folder with one JPEG file per image of the dump)``;
        the dump's products 0 and 1 have two images each (files ``p0-0.jpg``, ``p0-1.jpg``, ...).
    """
    base = factory.getbasetemp()
    if base in _RUNS:
        return _RUNS[base]
    root = factory.mktemp("image-run")
    tax = Taxonomy.from_csv(write_taxonomy(root / "category_names.csv"))
    products = synthetic_products(16, n_categories=1, max_images=1, seed=3)
    products = [(pid, int(tax.leaf_ids[i % tax.n_leaves]), jpegs) for i, (pid, _, jpegs) in enumerate(products)]
    for p in (0, 1):  # two products of two images
        products[p] = (products[p][0], products[p][1], products[p][2] + products[p + 2][2][::-1][:1])
    dump = root / "train.bson"
    write_dump(dump, products)
    store = extract_features(dump, tax, "test_efficientnet", "none", root / "features", image_size=32, progress=False)
    for kind in KINDS:
        train_head(kind, store, store, tax, TrainConfig(epochs=2, batch_size=8, progress=False), root / "run" / kind)
    images = root / "images"
    images.mkdir()
    source = open_source(dump, progress=False)
    for p in range(len(source)):
        for i, data in enumerate(source.read_images(p)):
            (images / f"p{p}-{i}.jpg").write_bytes(data)
    _RUNS[base] = (root / "run", dump, images)
    return _RUNS[base]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return image_run(tmp_path_factory)


def test_answers_equal_predict_on_the_dump(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A product's photos, as files or bytes, get predict's answer for that product of the dump."""
    run_dir, dump, images = run
    sub = tmp_path / "sub.csv"
    args = ["predict", "--run", str(run_dir), "--data", str(dump), "--out", str(sub), "--topk", "3", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = list(csv.DictReader(sub.open()))
    loaded = Run.load(run_dir)
    source = open_source(dump, progress=False)
    products = [[images / f"p{p}-{i}.jpg" for i in range(int(source.n_images[p]))] for p in range(len(source))]
    answers = loaded.predict_images(products, topk=3)
    as_bytes = loaded.predict_images([[f.read_bytes() for f in files] for files in products], topk=3)
    assert len(answers) == len(expected) == 16
    for row, answer, same in zip(expected, answers, as_bytes, strict=True):
        assert answer.leaves == same.leaves and answer.n_decoded == len(answer.sources)
        for i, leaf in enumerate(answer.leaves, 1):
            assert leaf.category_id == int(row[f"top{i}_category_id"])
            assert list(leaf.path) == [row[f"top{i}_level{j}"] for j in (1, 2, 3)]
            assert abs(leaf.probability - float(row[f"top{i}_prob"])) <= 2e-6
        assert sum(p for _, p in answer.level1) == pytest.approx(1.0, abs=1e-4)
        assert dict(answer.level1)[answer.leaves[0].path[0]] >= answer.leaves[0].probability - 1e-6
    assert answers[0].sources == (str(products[0][0]), str(products[0][1]))


def test_undecodable_images_get_no_leaf(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run_dir, _, images = run
    good = (images / "p3-0.jpg").read_bytes()
    loaded = Run.load(run_dir)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text, truncated, cut_file = b"hello, not a photo", good[: len(good) // 2], tmp_path / "cut.jpg"
    cut_file.write_bytes(truncated)
    answers = loaded.predict_images([text, truncated, b"", empty, cut_file, [good, text]], topk=2)
    for answer in answers[:5]:
        assert answer.leaves == () and answer.level1 == () and answer.category_id is None and answer.reason
        assert answer.to_dict()["predictions"] == []
    assert "not a decodable image" in answers[0].reason and "not a decodable image" in answers[1].reason
    assert "0 bytes" in answers[2].reason and "0 bytes" in answers[3].reason
    mixed = answers[5]  # a product keeps the answer of its good image, and says what it left out
    assert mixed.leaves == loaded.predict_images([good], topk=2)[0].leaves and mixed.n_decoded == 1
    assert mixed.problems == ("image 6.2: " + answers[0].reason,) and mixed.reason is None


def test_onnx_export_is_kept_in_the_run_and_reused(run: tuple[Path, Path, Path]) -> None:
    run_dir, _, images = run
    first = Run.load(run_dir)
    first.predict_images([images / "p3-0.jpg"])
    (export,) = (run_dir / "onnx").glob("*.onnx")
    assert export.name.startswith("test_efficientnet-32px-")
    stamp = export.stat().st_mtime_ns
    assert first.feature_extractor() is first.feature_extractor()  # built once per Run
    again = Run.load(run_dir)  # a new start: the export is found, not made again
    answer = again.predict_images([images / "p3-0.jpg"])[0]
    assert export.stat().st_mtime_ns == stamp and list((run_dir / "onnx").iterdir()) == [export]
    assert answer.leaves == first.predict_images([images / "p3-0.jpg"])[0].leaves
    torch_answer = again.predict_images([images / "p3-0.jpg"], engine="torch")[0]
    assert [leaf.category_id for leaf in torch_answer.leaves] == [leaf.category_id for leaf in answer.leaves]


def test_abstention_and_models(run: tuple[Path, Path, Path]) -> None:
    run_dir, _, images = run
    loaded = Run.load(run_dir)
    files = sorted(images.glob("*.jpg"))[:4]
    sure = loaded.predict_images(files, abstain_threshold=0.0)
    never = loaded.predict_images(files, abstain_threshold=1.0)
    assert all(a.depth == 3 for a in sure) and all(a.depth in (1, 2) for a in never)
    flat = loaded.predict_images(files, model="flat", topk=20)
    assert all(len(a.leaves) == 14 for a in flat)  # topk above the 14 leaves: every leaf, once
    assert all(sum(leaf.probability for leaf in a.leaves) == pytest.approx(1.0, abs=1e-4) for a in flat)
    with pytest.raises(Exception, match="has no fused model"):
        loaded.predict_images(files, model="fused")


def test_predict_command_on_image_files(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run_dir, _, images = run
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.jpg", "a.JPG"):
        (folder / name).write_bytes((images / "p3-0.jpg").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "notes.txt").write_text("not an image: left out")
    out = tmp_path / "out.csv"
    base = ["predict", "--run", str(run_dir), "--out", str(out)]
    result = runner.invoke(app, [*base, "--data", str(folder), "--topk", "2"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(folder / n) for n in ("a.JPG", "b.jpg", "broken.png")]
    assert list(rows[0])[:2] == ["path", "category_id"] and list(rows[0])[-1] == "reason"
    assert rows[0]["category_id"] == rows[1]["category_id"] != "" and rows[0]["reason"] == ""
    assert rows[2]["category_id"] == rows[2]["top1_category_id"] == "" and "not a decodable" in rows[2]["reason"]
    assert "1 could not be used" in result.stdout
    expected = Run.load(run_dir).predict_images([folder / "a.JPG"], topk=2)[0]
    assert float(rows[0]["top1_prob"]) == pytest.approx(expected.leaves[0].probability, abs=1e-6)

    one = runner.invoke(app, [*base, "--data", str(images / "p3-0.jpg"), "--data", str(folder / "broken.png")])
    assert one.exit_code == 0, one.output
    assert out.read_text().splitlines()[0] == "path,category_id,reason"
    assert len(out.read_text().splitlines()) == 3
    flat = runner.invoke(
        app, [*base, "--data", str(images / "p3-0.jpg"), "--model", "flat", "--abstain-threshold", "1"]
    )
    assert flat.exit_code == 0, flat.output
    row = next(csv.DictReader(out.open()))
    assert row["depth"] in ("1", "2") and row["category_id"] == "" and row["level1"].startswith("BRANCH")


def test_predict_command_image_errors(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run_dir, dump, images = run
    out = tmp_path / "out.csv"
    base = ["predict", "--run", str(run_dir), "--out", str(out)]
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    result = runner.invoke(app, [*base, "--data", str(empty)])
    assert result.exit_code == 1 and "no image files found" in result.stderr and str(empty) in result.stderr
    result = runner.invoke(app, [*base, "--data", str(images / "p3-0.jpg"), "--data", str(dump)])
    assert result.exit_code == 1 and "several sources" in result.stderr
    result = runner.invoke(app, [*base, "--data", str(images / "p3-0.jpg"), "--tta"])
    assert result.exit_code == 1 and "--tta is for dumps" in result.stderr
    assert not out.exists()
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.jpg"
        locked.write_bytes((images / "p3-0.jpg").read_bytes())
        locked.chmod(0)
        answer = Run.load(run_dir).predict_images([locked])[0]
        assert answer.leaves == () and "cannot be read" in (answer.reason or "")
