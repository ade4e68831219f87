from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hierclass.cli import app
from hierclass.synthetic import write_synthetic_store
from hierclass.taxonomy import Taxonomy

runner = CliRunner()
ROWS = [(i, f"BRANCH {i % 3}", f"mid {i % 4}", f"leaf {i}") for i in range(12)]


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, str]:
    csv_path = tmp_path / "category_names.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category_id", "category_level1", "category_level2", "category_level3"])
        w.writerows(ROWS)
    tax = Taxonomy.from_csv(csv_path)
    write_synthetic_store(tmp_path / "train", tax, 400, 8, seed=1, noise=0.3)
    write_synthetic_store(tmp_path / "val", tax, 100, 8, seed=2, noise=0.3)
    return {"tax": str(csv_path), "train": str(tmp_path / "train"), "val": str(tmp_path / "val"), "run": str(tmp_path)}


def args(s: dict[str, str], *extra: str, val: bool = True) -> list[str]:
    base = ["--train", s["train"], "--taxonomy", s["tax"], "--run", str(Path(s["run"]) / "run"), "--epochs", "2"]
    return base + (["--val", s["val"]] if val else []) + list(extra)


def test_train_all_three(setup: dict[str, str]) -> None:
    run = Path(setup["run"]) / "run"
    for command, kind in (("train-router", "router"), ("train-experts", "experts"), ("train-flat", "flat")):
        result = runner.invoke(app, [command, *args(setup, "--lr", "0.01", "--hidden", "4", "--class-balance", "loss")])
        assert result.exit_code == 0, result.output
        assert f"{kind}: best epoch" in result.stdout and "val acc" in result.stdout
        assert (run / kind / "model.safetensors").is_file() and (run / kind / "log.jsonl").is_file()
    result = runner.invoke(app, ["train-experts", *args(setup, "--branch", "BRANCH 1", "--hidden", "4")])
    assert result.exit_code == 0, result.output
    assert "experts (branch 'BRANCH 1')" in result.stdout


def test_without_val_holds_out_products(setup: dict[str, str]) -> None:
    result = runner.invoke(app, ["train-flat", *args(setup, val=False)])
    assert result.exit_code == 0, result.output
    assert "no --val: validating on a deterministic 10% of the training products" in result.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--branch", "NOPE"], "no level-1 branch named 'NOPE'"),
        (["--branch", "BRANCH 1"], "train all experts first"),
        (["--device", "tpu"], "not supported"),
    ],
)
def test_errors_are_one_line(setup: dict[str, str], extra: list[str], message: str) -> None:
    result = runner.invoke(app, ["train-experts", *args(setup, *extra)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_other_taxonomy_is_refused(setup: dict[str, str], tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text(Path(setup["tax"]).read_text() + "99,BRANCH 9,m,l\n")
    result = runner.invoke(app, ["train-router", *args({**setup, "tax": str(other)})])
    assert result.exit_code == 1 and "labelled with taxonomy" in result.stderr


def test_train_experts_with_other(setup: dict[str, str]) -> None:
    run = Path(setup["run"]) / "run"
    result = runner.invoke(app, ["train-experts", *args(setup, "--lr", "0.01", "--expert-other")])
    assert result.exit_code == 0, result.output
    meta = json.loads((run / "experts" / "meta.json").read_text())
    assert meta["head"]["other"] is True and meta["training"]["expert_other"] is True
    result = runner.invoke(app, ["train-experts", *args(setup, "--branch", "BRANCH 1", "--expert-other")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train-experts", *args(setup, "--branch", "BRANCH 1")])  # other-less retrain
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "--expert-other" in result.stderr
    # router and flat have no such option
    result = runner.invoke(app, ["train-flat", *args(setup, "--expert-other")])
    assert result.exit_code == 2 and "No such option" in result.output
