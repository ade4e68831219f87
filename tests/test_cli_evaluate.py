from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from test_report import shared_run, write_taxonomy
from typer.testing import CliRunner

from hierclass.cli import app
from hierclass.data import synthetic_products, write_dump
from hierclass.engine import KINDS, TrainConfig, train_head
from hierclass.features import extract_features
from hierclass.featurestore import FeatureStore
from hierclass.report import evaluate
from hierclass.run import Run, load_models
from hierclass.synthetic import write_synthetic_store
from hierclass.taxonomy import Taxonomy

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return shared_run(tmp_path_factory)


def one_error_line(result) -> str:  # noqa: ANN001
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_evaluate_features(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tax_csv, run_dir, val_dir = run
    out = tmp_path / "report"
    args = ["evaluate", "--run", str(run_dir), "--features", str(val_dir), "--out", str(out)]
    result = runner.invoke(app, [*args, "--abstain-threshold", "0.6", "--fused-alpha", "0.3", "--combine", "topk"])
    assert result.exit_code == 0, result.output
    assert "hierarchical" in result.stdout and "report.md" in result.stdout
    assert "hierarchical vs flat: " in result.stdout and "fused vs flat: " in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["models"] == ["flat", "hierarchical", "fused"]
    assert report["meta"]["abstain_threshold"] == 0.6 and report["hierarchical"]["abstain"]["threshold"] == 0.6
    assert report["hierarchical"]["settings"]["combine"] == "topk"
    assert report["meta"]["taxonomy"]["source"] == str(tax_csv)  # found through the run's checkpoints
    assert (out / "report.md").is_file() and (out / "reliability.png").is_file()
    assert report["fused"]["settings"]["alpha"] == 0.3


def own_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the shared run for a test that stores a calibration in it."""
    return Path(shutil.copytree(run_dir, tmp_path / "own-run", symlinks=True))


def test_evaluate_calibrated_and_tuned(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, run_dir, val_dir = run
    run_dir = own_copy(run_dir, tmp_path)
    out = tmp_path / "report"
    args = ["evaluate", "--run", str(run_dir), "--features", str(val_dir), "--out", str(out)]
    result = runner.invoke(app, [*args, "--calibrate", str(val_dir), "--fused-alpha", "auto"])
    assert result.exit_code == 0, result.output
    assert "calibrated   hierarchical: router_temperature=" in result.stdout
    assert "WARNING: temperatures and fusion weights were fitted on the scored images" in result.stderr
    assert "> **Warning:** temperatures and fusion weights" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["splits"]["calibration"] == f"all 240 labelled images of {val_dir}"
    assert report["flat"]["settings"]["temperature"] != 1.0
    assert report["hierarchical"]["settings"]["expert_temperature"] != 1.0
    assert min(abs(report["fused"]["settings"]["alpha"] - i / 20) for i in range(21)) < 1e-9
    # calibration does not change which leaf wins for flat (one temperature scales every logit)
    tax = Taxonomy.from_csv(report["meta"]["taxonomy"]["source"])
    plain = evaluate({"flat": load_models(run_dir, tax)["flat"]}, FeatureStore.open(val_dir))
    assert plain["flat"]["leaf_top1"] == report["flat"]["leaf_top1"]


def test_evaluate_calibrated_on_the_training_holdout(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, run_dir, val_dir = run
    train_dir, out = run_dir.parent / "train", tmp_path / "report"
    run_dir = own_copy(run_dir, tmp_path)
    args = ["evaluate", "--run", str(run_dir), "--features", str(val_dir), "--out", str(out)]
    result = runner.invoke(app, [*args, "--calibrate", str(train_dir), "--fused-alpha", "auto"])
    assert result.exit_code == 0, result.output
    held = json.loads((run_dir / "flat" / "meta.json").read_text())["metrics"]["n_holdout"]
    assert f"calibrating on the {held} held-out images of the run's training set" in result.stdout
    assert "WARNING" not in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["warnings"] == []
    assert report["meta"]["splits"]["calibration"].startswith(f"the {held} held-out images of the training set")
    assert report["flat"]["settings"]["temperature"] != 1.0
    # the run keeps what was fitted: a later evaluate (and predict, and serve) reads it without --calibrate
    assert f"kept in {run_dir / 'run.json'}" in result.stdout
    again = runner.invoke(app, [*args[:-1], str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    later = json.loads((tmp_path / "again" / "report.json").read_text())
    assert later["meta"]["models"] == ["flat", "hierarchical", "fused"]
    for name in later["meta"]["models"]:
        assert later[name]["settings"] == report[name]["settings"]
        assert later[name]["leaf_top1"] == report[name]["leaf_top1"]
    assert later["meta"]["splits"]["calibration"] == report["meta"]["splits"]["calibration"]
    loaded = Run.load(run_dir)
    assert loaded.models["fused"].alpha == report["fused"]["settings"]["alpha"]  # type: ignore[union-attr]
    assert Run.load(run_dir, calibrated=False).models["flat"].temperature == 1.0  # type: ignore[union-attr]
    assert loaded.spec.backbone == json.loads((val_dir / "meta.json").read_text()).get("backbone")


def test_ensemble_of_runs(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, run_dir, val_dir = run
    twin = own_copy(run_dir, tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["evaluate", "--features", str(val_dir)]
    assert runner.invoke(app, [*base, "--run", str(run_dir), "--out", str(one)]).exit_code == 0
    result = runner.invoke(app, [*base, "--run", str(run_dir), "--run", str(twin), "--out", str(two)])
    assert result.exit_code == 0, result.output
    single, pair = json.loads((one / "report.json").read_text()), json.loads((two / "report.json").read_text())
    assert pair["meta"]["run"] == [str(run_dir), str(twin)]
    assert pair["flat"]["settings"]["type"] == "ensemble" and len(pair["flat"]["settings"]["members"]) == 2
    for name in ("flat", "hierarchical"):  # the mean of two equal members is that member
        assert pair[name]["leaf_top1"] == single[name]["leaf_top1"]
        assert abs(pair[name]["ece"] - single[name]["ece"]) < 1e-6
    sub = tmp_path / "sub.csv"
    pred = ["predict", "--run", str(run_dir), "--run", str(twin), "--features", str(val_dir), "--out", str(sub)]
    assert runner.invoke(app, pred).exit_code == 0
    alone = tmp_path / "alone.csv"
    single_pred = ["predict", "--run", str(run_dir), "--features", str(val_dir), "--out", str(alone)]
    assert runner.invoke(app, single_pred).exit_code == 0
    assert sub.read_text() == alone.read_text()
    both = [*base, "--run", str(run_dir), "--run", str(twin), "--out", str(two)]
    line = one_error_line(runner.invoke(app, [*both, "--calibrate", str(val_dir)]))
    assert "calibrate each run alone first" in line


def test_predict_features(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tax_csv, run_dir, val_dir = run
    out = tmp_path / "sub.csv"
    base = ["predict", "--run", str(run_dir), "--features", str(val_dir), "--taxonomy", str(tax_csv), "--out"]
    result = runner.invoke(app, [*base, str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["_id", "category_id"] and len(rows) == 81
    leaf_ids = {str(c) for c in Taxonomy.from_csv(tax_csv).leaf_ids}
    assert all(r[1] in leaf_ids for r in rows[1:]) and len({r[0] for r in rows[1:]}) == 80
    result = runner.invoke(app, [*base, str(out), "--model", "flat", "--topk", "3", "--abstain-threshold", "0.9"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 80 and {"depth", "level1", "top3_prob", "top1_level3"} <= set(rows[0])
    assert all((r["category_id"] == "") == (r["depth"] != "3") for r in rows)
    assert all(float(r["top1_prob"]) >= float(r["top2_prob"]) >= float(r["top3_prob"]) for r in rows)


def test_cli_errors_are_one_line(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tax_csv, run_dir, val_dir = run
    base = ["evaluate", "--run", str(run_dir), "--out", str(tmp_path / "r")]
    line = one_error_line(runner.invoke(app, base))
    assert "exactly one of --features" in line
    line = one_error_line(runner.invoke(app, [*base, "--features", str(val_dir), "--tta"]))
    assert "hflip" in line
    other = tmp_path / "other.csv"
    other.write_text("category_id,category_level1,category_level2,category_level3\n1,A,B,C\n")
    line = one_error_line(runner.invoke(app, [*base, "--features", str(val_dir), "--taxonomy", str(other)]))
    assert "taxonomy" in line
    line = one_error_line(runner.invoke(app, ["evaluate", "--run", str(tmp_path), "--out", str(tmp_path / "r")]))
    assert "no flat/, router/ or experts/" in line
    (tmp_path / "flat_only").mkdir()
    (tmp_path / "flat_only" / "flat").symlink_to(run_dir / "flat")
    pred = ["predict", "--run", str(tmp_path / "flat_only"), "--features", str(val_dir), "--out", str(tmp_path / "p")]
    assert "has no hierarchical model" in one_error_line(runner.invoke(app, pred))
    assert "needs both" in one_error_line(runner.invoke(app, [*pred, "--model", "fused"]))
    ev = ["evaluate", "--run", str(run_dir), "--features", str(val_dir), "--out", str(tmp_path / "r")]
    assert "with --calibrate" in one_error_line(runner.invoke(app, [*ev, "--fused-alpha", "auto"]))
    assert "outside [0, 1]" in one_error_line(runner.invoke(app, [*ev, "--fused-alpha", "2"]))
    assert "not a number" in one_error_line(runner.invoke(app, [*ev, "--fused-alpha", "half"]))
    write_synthetic_store(tmp_path / "narrow", Taxonomy.from_csv(tax_csv), n=10, dim=8)
    narrow = ["predict", "--run", str(run_dir), "--features", str(tmp_path / "narrow"), "--out", str(tmp_path / "p")]
    line = one_error_line(runner.invoke(app, narrow))
    assert "features are 8 wide" in line and str(run_dir) in line and "takes 12" in line


def test_end_to_end_from_a_dump(tmp_path: Path) -> None:
    """Dump -> features (tiny random backbone) -> trained run -> evaluate --data / predict --data."""
    tax_csv = write_taxonomy(tmp_path / "category_names.csv")
    tax = Taxonomy.from_csv(tax_csv)
    products = synthetic_products(10, n_categories=1, max_images=2)
    products = [
        (pid, int(tax.leaf_ids[i % tax.n_leaves]), jpegs, f"SKU-{pid}" if i != 3 else None)
        for i, (pid, _, jpegs) in enumerate(products)
    ]
    products.append((5000, int(tax.leaf_ids[0]), [b"not a jpeg"], "SKU-5000"))  # no usable image: still gets a row
    dump = tmp_path / "train.bson"
    write_dump(dump, products)
    store = extract_features(
        dump, tax, "test_efficientnet", "none", tmp_path / "feats", engine="torch", image_size=32, progress=False
    )
    config = TrainConfig(epochs=1, batch_size=8, progress=False)
    for kind in KINDS:
        train_head(kind, store, store, tax, config, tmp_path / "run" / kind)
    out = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "run"), "--data", str(dump), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["flat"]["n_products"] == 10 and report["hierarchical"]["n_images"] == store.valid.sum()
    (cache,) = (tmp_path / "run" / "features").iterdir()  # evaluate caches under the run, not the report
    assert cache.name.startswith("train.bson-") and (cache / "meta.json").is_file()
    assert not (out / "features").exists()
    csv_path = tmp_path / "submission.csv"
    args = ["predict", "--run", str(tmp_path / "run"), "--data", str(dump), "--out", str(csv_path), "--topk", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 without a usable image" in result.stdout
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["_id"]) for r in rows] == [p[0] for p in products]
    assert [r["sku"] for r in rows] == [p[3] or "" for p in products] and list(rows[0])[-1] == "sku"
    assert list((tmp_path / "run" / "features").iterdir()) == [cache]  # predict found evaluate's cache
    plain = tmp_path / "plain.bson"
    write_dump(plain, [p[:3] for p in products])
    args = ["predict", "--run", str(tmp_path / "run"), "--data", str(plain), "--out", str(csv_path), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert csv_path.read_text().splitlines()[0] == "_id,category_id"  # no SKUs, no sku column
    assert result.stderr == ""  # --no-progress: extraction and indexing draw no bars

    folders = tmp_path / "by-name"  # ImageFolder style: one folder per level-3 name
    for i, (_, cid, jpegs, _) in enumerate(products[:4]):
        (folders / tax.leaf_names[tax.leaf_index(cid)]).mkdir(parents=True, exist_ok=True)
        (folders / tax.leaf_names[tax.leaf_index(cid)] / f"{i}.jpg").write_bytes(jpegs[0])
    args = ["predict", "--run", str(tmp_path / "run"), "--data", str(folders), "--out", str(csv_path), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader(csv_path.open()))) == 4


def test_features_cache_is_keyed_by_content(tmp_path: Path) -> None:
    from hierclass.cli.evaluate import features_cache_dir

    run = tmp_path / "run"
    a, b = tmp_path / "a" / "val", tmp_path / "b" / "val"
    for folder in (a, b):
        (folder / "5").mkdir(parents=True)
    first = features_cache_dir(run, a)
    assert first.parent == run / "features" and first.name.startswith("val-")
    assert features_cache_dir(run, a) == first and features_cache_dir(run, b) != first  # same name, other folder
    assert features_cache_dir(run, a, {"hflip": True}) != first  # other settings, another cache
    assert features_cache_dir(run, a, {"backbone": "x", "hflip": False}) == features_cache_dir(
        run, a, {"hflip": False, "backbone": "x"}
    )
    dump = tmp_path / "val.bson"
    write_dump(dump, synthetic_products(2))
    before = features_cache_dir(run, dump)
    write_dump(dump, synthetic_products(3))  # the source changed: a fresh cache
    assert features_cache_dir(run, dump) != before
    (a / "6").mkdir()  # a category folder more
    assert features_cache_dir(run, a) != first


def test_real_cdiscount_sample(cdiscount_taxonomy_csv: Path, cdiscount_sample_bson: Path, tmp_path: Path) -> None:
    """The real taxonomy (5,270 leaves, 49 branches) and the real sample dump, through predict and evaluate."""
    tax = Taxonomy.from_csv(cdiscount_taxonomy_csv)
    store = extract_features(
        cdiscount_sample_bson, tax, "test_efficientnet", "none", tmp_path / "f", engine="torch", image_size=32,
        progress=False,
    )  # fmt: skip
    config = TrainConfig(epochs=1, batch_size=32, progress=False)
    for kind in KINDS:
        train_head(kind, store, store, tax, config, tmp_path / "run" / kind)
    run = ["--run", str(tmp_path / "run"), "--features", str(tmp_path / "f"), "--taxonomy", str(cdiscount_taxonomy_csv)]
    out = tmp_path / "sub.csv"
    result = runner.invoke(app, ["predict", *run, "--out", str(out), "--combine", "topk", "--topk", "5"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 82 and all(int(r["category_id"]) in set(tax.leaf_ids.tolist()) for r in rows)
    report = evaluate(load_models(tmp_path / "run", tax), FeatureStore.open(tmp_path / "f"))  # CLI: tested above
    assert report["hierarchical"]["n_images"] == 110 and report["flat"]["n_products"] == 82
    assert len(report["flat"]["per_branch"]) == 49
