from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hierclass.cli import app
from hierclass.data.synthetic import make_synthetic_catalogue
from hierclass.engine import TrainConfig
from hierclass.errors import HierclassError
from hierclass.pipeline import PipelineConfig, run_pipeline, summary_rows

TINY = dict(backbone="test_efficientnet", pretrained="none", image_size=32, engine="torch")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory):
    return make_synthetic_catalogue(tmp_path_factory.mktemp("cat"), n_train=60, n_val=30)


def test_pipeline_end_to_end_and_resume(tmp_path: Path, catalogue) -> None:
    config = PipelineConfig(**TINY, train=TrainConfig(epochs=2, progress=False))
    logs: list[str] = []
    result = run_pipeline(catalogue.train, catalogue.val, catalogue.taxonomy, tmp_path / "w", config, log=logs.append)
    report = result.report
    assert report["meta"]["models"] == ["flat", "hierarchical", "hierarchical_calibrated", "fused"]
    for name in report["meta"]["models"]:
        m = report[name]
        assert m["n_products"] == 30 and m["level1_acc"] >= m["leaf_top1"]
    assert 0.0 <= report["fused"]["settings"].get("alpha", 0.5) <= 1.0
    # temperatures and fusion weight come from the training set's holdout, not from the scored images
    splits = report["meta"]["splits"]
    assert "held-out images of the training set" in splits["calibration"] and "train" in splits["calibration"]
    assert "0.1 of the products of" in splits["early_stopping"] and "val" in splits["scored"]
    assert report["meta"]["warnings"] == [] and not any("WARNING" in line for line in logs)
    assert "- temperatures and fusion weight: the " in result.report_md.read_text()
    assert (tmp_path / "w" / "report" / "report.json").is_file() and result.report_md.is_file()
    assert len(summary_rows(report)) == 5
    # the run folder's manifest records each head, as the train-* commands write it
    heads = json.loads((tmp_path / "w" / "run" / "run.json").read_text())["heads"]
    assert sorted(heads) == ["experts", "flat", "router"]
    assert heads["flat"]["config"]["epochs"] == 2 and heads["flat"]["train"].endswith("train")
    assert heads["router"]["metrics"]["n_train"] > 0
    # a second run reuses the features and the trained heads
    again = run_pipeline(catalogue.train, catalogue.val, catalogue.taxonomy, tmp_path / "w", config, log=logs.append)
    assert again.timings["train flat"] == 0.0 and any("reusing" in line for line in logs)
    assert again.report["flat"]["leaf_top1"] == report["flat"]["leaf_top1"]
    # ... but never a head of another shape than the config asks for
    other = PipelineConfig(
        **TINY, train=TrainConfig(epochs=2, progress=False), per_kind={"experts": {"expert_other": True}}
    )
    with pytest.raises(HierclassError, match="experts: holds a head trained with"):
        run_pipeline(catalogue.train, catalogue.val, catalogue.taxonomy, tmp_path / "w", other, log=logs.append)


def test_demo_command_labels_synthetic(tmp_path: Path) -> None:
    args = ["demo", "--synthetic", "--out", str(tmp_path), "--n-train", "40", "--n-val", "20", "--epochs", "1"]
    args += [
        "--backbone",
        TINY["backbone"],
        "--pretrained",
        TINY["pretrained"],
        "--image-size",
        "32",
        "--engine",
        "torch",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("SYNTHETIC DATA") == 2
    assert "hierarchical" in result.output and "fused" in result.output
    assert "vs flat (images)" in result.output and "baseline" in result.output and " p=" in result.output


def test_demo_without_progress_draws_no_bar(tmp_path: Path) -> None:
    args = ["demo", "--synthetic", "--out", str(tmp_path), "--n-train", "40", "--n-val", "20", "--epochs", "1"]
    args += ["--backbone", TINY["backbone"], "--pretrained", TINY["pretrained"], "--image-size", "32"]
    result = CliRunner().invoke(app, [*args, "--engine", "torch", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "[features train] done" in result.output and "img/s]" not in result.output


def test_demo_needs_all_three_paths(tmp_path: Path) -> None:
    for partial in (["--train", "x.bson"], ["--train", "x.bson", "--val", "y.bson"], ["--taxonomy", "t.csv"]):
        result = CliRunner().invoke(app, ["demo", *partial, "--out", str(tmp_path)])
        assert result.exit_code == 1 and result.stderr.startswith(
            "error: give --train, --val and --taxonomy together, or none of them"
        )
        assert result.stderr.count("\n") == 1 and not any(tmp_path.iterdir())  # refused before any work


def test_fashion_subset_is_stratified_and_reused(tmp_path: Path, catalogue) -> None:
    from hierclass.cli.demo import fashion_subset
    from hierclass.data import open_source

    full = open_source(catalogue.train, cache_dir=tmp_path / "idx")
    out = fashion_subset(catalogue.train, tmp_path / "sub" / "train.bson", 0.5)
    sub = open_source(out, cache_dir=tmp_path / "idx")
    assert 0 < len(sub) < len(full)
    assert set(sub.product_ids.tolist()) <= set(full.product_ids.tolist())
    for p in range(len(sub)):  # the same products, images and labels as in the full dump
        q = int((full.product_ids == sub.product_ids[p]).nonzero()[0][0])
        assert sub.category_ids[p] == full.category_ids[q] and sub.read_images(p) == full.read_images(q)
    assert fashion_subset(catalogue.train, out, 0.5) == out  # written once, then reused
    assert fashion_subset(catalogue.train, tmp_path / "x.bson", 1.0) == catalogue.train


def test_summary_rows_when_a_model_makes_no_mistake() -> None:
    perfect = {"leaf_top1": 1.0, "level1_acc": 1.0, "level2_acc": 1.0, "mistake_severity": None}
    report = {"meta": {"models": ["flat"]}, "flat": {**perfect, "product": {"leaf_top1": 1.0}}}
    assert summary_rows(report)[1] == ("flat", "1.0000", "1.0000", "1.0000", "–", "1.0000", "baseline")
    report["meta"]["models"].append("hier")
    versus = {"diff": -0.0072, "ci_low": -0.021, "ci_high": 0.0066, "mcnemar_p": 0.314}
    versus["verdict"] = "no clear difference"
    report["hier"] = {**perfect, "mistake_severity": 1.5, "product": {"leaf_top1": 0.9}, "vs_flat": versus}
    assert summary_rows(report)[2][-2:] == ("0.9000", "-0.72 pts [-2.10, +0.66] p=0.31: no clear difference")


def test_fashion_is_found_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import SHARED_DATA, shared_file

    from hierclass.cli.demo import data_roots, find_fashion

    shared_file("fashion", "train.bson")
    monkeypatch.chdir(tmp_path)  # nowhere near the checkout
    assert find_fashion(data_roots()) == SHARED_DATA / "fashion"


def test_demo_data_root(tmp_path: Path) -> None:
    from hierclass.cli.demo import find_fashion

    root = tmp_path / "data"
    (root / "fashion").mkdir(parents=True)
    for name in ("train.bson", "val.bson"):
        (root / "fashion" / name).touch()
    assert find_fashion([tmp_path / "nothing", root]) is None  # category_names.csv missing
    (root / "fashion" / "category_names.csv").touch()
    assert find_fashion([tmp_path / "nothing", root]) == root / "fashion"
    result = CliRunner().invoke(app, ["demo", "--data-root", str(tmp_path / "nothing"), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--data-root" in result.output
    assert str(tmp_path / "nothing" / "fashion") in result.output.replace("\n", "")
