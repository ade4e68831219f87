from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from hierclass.engine import KINDS, TrainConfig, train_head
from hierclass.errors import CheckpointError
from hierclass.featurestore import FeatureStore, FeatureStoreError
from hierclass.inference import FusedClassifier, HierarchicalClassifier, Predictions
from hierclass.report import (
    evaluate,
    fill_missing_products,
    submission_products,
    submission_rows,
    write_predictions,
    write_report,
)
from hierclass.run import check_store, load_models
from hierclass.synthetic import write_synthetic_store
from hierclass.taxonomy import Taxonomy

MODEL_KEYS = (
    "leaf_top1",
    "leaf_top5",
    "level1_acc",
    "level2_acc",
    "macro_f1",
    "hierarchical_f1",
    "mistake_severity",
    "ece",
    "n_images",
    "n_products",
    "ms_per_1000_images",
    "per_branch",
    "product",
)


def write_taxonomy(path: Path) -> Path:
    """A 4-branch taxonomy (branch sizes 1, 3, 4, 6) as a category_names.csv."""
    rows, cid = [], 1000
    for b, size in enumerate((1, 3, 4, 6)):
        for leaf in range(size):
            rows.append((cid, f"BRANCH {b}", f"NODE {b}-{leaf % 2}", f"LEAF {cid}"))
            cid += 1
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["category_id", "category_level1", "category_level2", "category_level3"])
        w.writerows(rows)
    return path


def make_run(root: Path, kinds: tuple[str, ...] = KINDS) -> tuple[Path, Path, Path]:
    """A tiny trained run on synthetic features: (taxonomy csv, run dir, validation features)."""
    tax_csv = write_taxonomy(root / "category_names.csv")
    tax = Taxonomy.from_csv(tax_csv)
    train = write_synthetic_store(root / "train", tax, n=400, dim=12, seed=1, noise=1.0)
    val = write_synthetic_store(root / "val", tax, n=240, dim=12, seed=2, noise=1.0, images_per_product=3)
    config = TrainConfig(epochs=2, batch_size=64, lr=3e-2, progress=False, patience=0)
    for kind in kinds:
        train_head(kind, train, val, tax, config, root / "run" / kind)
    return tax_csv, root / "run", root / "val"


_RUNS: dict[Path, tuple[Path, Path, Path]] = {}


def shared_run(factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One tiny run per test session, shared by the report and CLI tests (training is the slow part)."""
    base = factory.getbasetemp()
    if base not in _RUNS:
        _RUNS[base] = make_run(factory.mktemp("run"))
    return _RUNS[base]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return shared_run(tmp_path_factory)


def test_evaluate_report_keys_and_consistency(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tax_csv, run_dir, val_dir = run
    tax = Taxonomy.from_csv(tax_csv)
    store = FeatureStore.open(val_dir)
    models = load_models(run_dir, tax)
    assert list(models) == ["flat", "hierarchical"]
    check_store(store, models)
    hard = HierarchicalClassifier.from_run(run_dir, tax, combine="hard")
    fused = FusedClassifier(models["flat"], models["hierarchical"], alpha=0.5)
    report = evaluate({**models, "hard": hard, "fused": fused}, store, abstain_threshold=0.5)
    assert report["meta"]["models"] == ["flat", "hierarchical", "hard", "fused"]
    for name in report["meta"]["models"]:
        entry = report[name]
        for key in MODEL_KEYS:
            assert key in entry, (name, key)
        assert entry["n_images"] == 240 and entry["n_products"] == 80 and entry["product"]["n"] == 80
        for level in (entry, entry["product"]):
            assert level["leaf_top5"] >= level["leaf_top1"]
            assert level["level1_acc"] >= level["level2_acc"] >= level["leaf_top1"]
            assert 0 <= level["ece"] <= 1 and 0 <= level["hierarchical_f1"] <= 1
            assert len(level["per_branch"]) == tax.n_level1
        assert entry["leaf_top1"] > 0.3  # the synthetic problem is learnable
    for name in ("hierarchical", "hard"):
        entry = report[name]
        for level in (entry, entry["product"]):
            assert level["oracle_leaf_top1"] >= level["leaf_top1"]
            assert "router_acc" in level["per_branch"][0]
    # hard routing: the predicted leaf is in the router's branch
    assert report["hard"]["level1_acc"] == pytest.approx(report["hard"]["router_acc"])
    assert report["hard"]["settings"]["combine"] == "hard" and report["fused"]["settings"]["alpha"] == 0.5
    # a verdict against flat for every other model, on the same images and products
    assert "vs_flat" not in report["flat"]
    for name in ("hierarchical", "hard", "fused"):
        for level in (report[name], report[name]["product"]):
            v, flat = level["vs_flat"], report["flat"] if level is report[name] else report["flat"]["product"]
            assert v["diff"] == pytest.approx(level["leaf_top1"] - flat["leaf_top1"])
            assert v["ci_low"] <= v["diff"] <= v["ci_high"] and 0 < v["mcnemar_p"] <= 1
            assert v["n"] == (240 if level is report[name] else 80)
    md = write_report(report, tmp_path / "rep")
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["hierarchical"]["leaf_top1"] == report["hierarchical"]["leaf_top1"]
    assert saved["fused"]["vs_flat"] == report["fused"]["vs_flat"]
    text = md.read_text()
    assert "## Verdict against flat" in text and "- hierarchical vs flat: " in text and "McNemar p=" in text
    for png in ("per_branch.png", "reliability.png", "coverage.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000 and f"({png})" in text
    assert "| leaf top-1 |" in text and "fused" in text and "BRANCH 3" in text
    assert not (tmp_path / "rep" / "branch_size.png").exists()  # 4 branches: too few for that plot
    assert "## Products\n\n| metric |" in text  # 3 images per product: a table of its own
    # the most confused pairs, and a confusion matrix per branch of 2+ leaves (branch 0 has one leaf),
    # on noisier images of the same problem (the clean ones may all be right)
    noisy_store = write_synthetic_store(tmp_path / "noisy", tax, n=240, dim=12, seed=5, noise=4.0)
    noisy = evaluate(models, noisy_store)
    assert 0 < noisy["hierarchical"]["leaf_top1"] < 1
    text = write_report(noisy, tmp_path / "noisy_rep").read_text()
    assert "## Most confused leaf pairs (images)" in text and "| hierarchical | BRANCH" in text
    sizes = [sum(r["n"] for r in noisy["hierarchical"]["per_branch"] if r["branch"] == b) for b in (1, 2, 3)]
    shown = [b["branch"] for b in noisy["hierarchical"]["branch_confusion"]]
    assert sorted(shown) == [1, 2, 3] and [sizes[b - 1] for b in shown] == sorted(sizes, reverse=True)
    for b in (1, 2, 3):
        png = tmp_path / "noisy_rep" / f"confusion_{b}.png"
        assert png.stat().st_size > 1000 and f"(confusion_{b}.png)" in text
    for block in noisy["hierarchical"]["branch_confusion"]:
        row = noisy["hierarchical"]["per_branch"][block["branch"]]
        assert sum(c for _, _, c in block["cells"]) == row["n"]
        right = sum(c for t, p, c in block["cells"] if t == p)
        assert right == pytest.approx(row["leaf_acc"] * row["n"])
    # one image per product: no second copy of the image table
    single = json.loads(json.dumps(report))
    for name in single["meta"]["models"]:
        single[name]["n_products"] = single[name]["n_images"]
    single_md = write_report(single, tmp_path / "single").read_text()
    assert "Every product has one image" in single_md and "## Products\n\n| metric |" not in single_md


def test_load_run_alone_and_errors(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tax_csv, run_dir, val_dir = run
    tax = Taxonomy.from_csv(tax_csv)
    (tmp_path / "only_flat").mkdir()
    (tmp_path / "only_flat" / "flat").symlink_to(run_dir / "flat")
    assert list(load_models(tmp_path / "only_flat", tax)) == ["flat"]
    with pytest.raises(CheckpointError, match="no flat/, router/ or experts/"):
        load_models(tmp_path, tax)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "router").symlink_to(run_dir / "router")
    with pytest.raises(CheckpointError, match="no experts/ checkpoint"):
        load_models(tmp_path / "half", tax)
    other = write_synthetic_store(tmp_path / "other", tax, n=10, dim=12, meta={"backbone": "resnet50"})
    with pytest.raises(FeatureStoreError, match="backbone"):
        check_store(other, load_models(run_dir, tax))
    narrow = write_synthetic_store(tmp_path / "narrow", tax, n=10, dim=8)
    with pytest.raises(FeatureStoreError, match=r"narrow: features are 8 wide but the flat head of .*run takes 12"):
        check_store(narrow, load_models(run_dir, tax), run_dir)
    with pytest.raises(FeatureStoreError, match="8 wide"):  # evaluate refuses them too, before any forward pass
        evaluate(load_models(run_dir, tax), narrow)
    with pytest.raises(FeatureStoreError, match="hflip"):
        evaluate(load_models(run_dir, tax), FeatureStore.open(val_dir), tta=True)
    with pytest.raises(ValueError, match="reserved"):
        evaluate({"meta": load_models(run_dir, tax)["flat"]}, FeatureStore.open(val_dir))
    unlabelled = write_synthetic_store(tmp_path / "unlabelled", tax, n=4, dim=12)
    unlabelled.leaf[:] = -1  # the in-memory labels only
    with pytest.raises(FeatureStoreError, match="no labelled images"):
        evaluate(load_models(run_dir, tax), unlabelled)


def preds_fixture() -> tuple[Taxonomy, Predictions]:
    tax = Taxonomy.from_rows([(1, "A", "a", "x"), (2, "A", "a", "y"), (3, "B", "b", "z")])
    proba = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])
    return tax, Predictions.from_proba(proba, tax, np.array([11, 12, 13]))


def test_submission_format(tmp_path: Path) -> None:
    tax, preds = preds_fixture()
    path = write_predictions(tmp_path / "sub" / "out.csv", preds, tax)
    assert path.read_text() == "_id,category_id\n11,1\n12,3\n13,3\n"
    header, rows = submission_rows(preds, tax, topk=2, abstain_threshold=0.5)
    assert header[:5] == ["_id", "category_id", "depth", "level1", "level2"]
    assert header[5:10] == ["top1_category_id", "top1_level1", "top1_level2", "top1_level3", "top1_prob"]
    assert rows[0][:5] == [11, 1, 3, "A", "a"]
    assert rows[1][:5] == [12, "", 1, "B", ""]  # 0.4 for the leaf, its level-2 node and branch
    assert rows[1][5:10] == [3, "B", "b", "z", "0.400000"]
    assert not (tmp_path / "sub" / "out.csv.tmp").exists()
    with pytest.raises(ValueError, match="topk=9"):
        submission_rows(preds, tax, topk=9)


def test_fill_missing_products() -> None:
    tax, preds = preds_fixture()
    filled, n = fill_missing_products(preds, np.array([13, 99, 11]))
    assert n == 1 and filled.ids.tolist() == [13, 99, 11]
    assert filled.pred.tolist() == [2, 2, 0]  # the most predicted leaf for the missing product
    assert filled.topk_prob[1, 0] == pytest.approx(2 / 3)


def test_submission_products_one_per_id() -> None:
    """Products are matched by their source row; of products sharing an _id, the first keeps the row."""
    tax, preds = preds_fixture()
    preds.ids, preds.product_row = np.array([11, 12, 11]), np.array([0, 1, 2])
    filled, n = fill_missing_products(preds, np.array([11, 11, 12]), np.array([2, 0, 1]))
    assert n == 0 and filled.ids.tolist() == [11, 11, 12] and filled.pred.tolist() == [2, 0, 2]
    assert filled.product_row.tolist() == [2, 0, 1]
    kept, n, repeated = submission_products(preds, np.array([11, 12, 11, 14, 14]), np.arange(5))
    assert kept.ids.tolist() == [11, 12, 14] and kept.product_row.tolist() == [0, 1, 3]
    assert kept.pred.tolist() == [0, 2, 2] and n == 1 and repeated.tolist() == [11, 14]  # row 3: no prediction
    with pytest.raises(ValueError, match="record no product_row"):
        fill_missing_products(preds_fixture()[1], np.array([11]), np.array([0]))


def test_calibration_on_the_training_holdout(run: tuple[Path, Path, Path]) -> None:
    from hierclass.data.splits import holdout_mask
    from hierclass.run import calibrate, training_holdout

    tax_csv, run_dir, val_dir = run
    tax = Taxonomy.from_csv(tax_csv)
    train = FeatureStore.open(run_dir.parent / "train")
    models = load_models(run_dir, tax)
    held = training_holdout(train, models)
    assert held is not None
    np.testing.assert_array_equal(held, holdout_mask(train.product_id, train.leaf, fraction=0.1, seed=0))
    meta = json.loads((run_dir / "flat" / "meta.json").read_text())
    assert int((held & train.valid).sum()) == meta["metrics"]["n_holdout"]
    assert training_holdout(FeatureStore.open(val_dir), models) is None  # not what the heads were trained on
    # fitting on the rows given is fitting on those rows alone
    flat = load_models(run_dir, tax)["flat"]
    calibrate({"flat": models["flat"]}, train, rows=held)
    rows = np.flatnonzero(held & train.valid)
    flat.calibrate(np.asarray(train.features())[rows], train.leaf[rows])
    assert models["flat"].temperature == pytest.approx(flat.temperature) and flat.temperature != 1.0
    with pytest.raises(FeatureStoreError, match="no labelled images to calibrate on"):
        calibrate({"flat": models["flat"]}, train, rows=np.zeros(train.n_images, dtype=bool))
