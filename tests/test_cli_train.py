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
        assert f"{kind}: AdamW, best epoch" in result.stdout and "val acc" in result.stdout
        assert (run / kind / "model.safetensors").is_file() and (run / kind / "log.jsonl").is_file()
    result = runner.invoke(app, ["train-experts", *args(setup, "--branch", "BRANCH 1", "--hidden", "4")])
    assert result.exit_code == 0, result.output
    assert "experts (branch 'BRANCH 1')" in result.stdout


def test_run_dir_is_the_run_option(setup: dict[str, str]) -> None:
    run = Path(setup["run"]) / "by-run-dir"
    base = ["--train", setup["train"], "--taxonomy", setup["tax"], "--run-dir", str(run), "--epochs", "1"]
    result = runner.invoke(app, ["train-router", *base, "--solver", "adamw"])
    assert result.exit_code == 0, result.output
    assert (run / "router" / "model.safetensors").is_file() and f"saved {run / 'router'}" in result.stdout


def test_without_val_holds_out_products(setup: dict[str, str]) -> None:
    result = runner.invoke(app, ["train-flat", *args(setup, val=False)])
    assert result.exit_code == 0, result.output
    assert "holdout acc" in result.stdout and "val acc" not in result.stdout


def test_linear_heads_default_to_lbfgs_with_one_line_per_c(setup: dict[str, str]) -> None:
    base = ["--train", setup["train"], "--taxonomy", setup["tax"], "--run", str(Path(setup["run"]) / "run")]
    result = runner.invoke(app, ["train-flat", *base, "--c-grid", "0.01,0.1"])
    assert result.exit_code == 0, result.output
    assert "L-BFGS, C=" in result.stdout
    per_c = [line for line in result.stderr.splitlines() if line.startswith("flat: C=")]
    assert len(per_c) == 3 and all("holdout acc" in line and "iterations" in line for line in per_c)
    assert sum("refined" in line for line in per_c) == 1  # two scouted, the kept one refined


def test_retraining_a_head_needs_overwrite(setup: dict[str, str]) -> None:
    run = Path(setup["run"]) / "run"
    assert runner.invoke(app, ["train-router", *args(setup, "--hidden", "4")]).exit_code == 0
    before = (run / "router" / "model.safetensors").read_bytes()
    result = runner.invoke(app, ["train-router", *args(setup, "--hidden", "4", "--seed", "3")])
    assert result.exit_code == 1 and "already holds a router head; pass --overwrite" in result.stderr
    assert (run / "router" / "model.safetensors").read_bytes() == before
    result = runner.invoke(app, ["train-router", *args(setup, "--hidden", "4", "--seed", "3", "--overwrite")])
    assert result.exit_code == 0, result.output
    assert (run / "router" / "model.safetensors").read_bytes() != before
    runs = {json.loads(line)["run"] for line in (run / "router" / "log.jsonl").read_text().splitlines()}
    assert len(runs) == 1  # the log describes the head in the folder, not the one it replaced


def test_run_keeps_its_taxonomy_and_manifest(setup: dict[str, str], tmp_path: Path, monkeypatch) -> None:
    run = Path(setup["run"]) / "run"
    assert runner.invoke(app, ["train-router", *args(setup, "--hidden", "4")]).exit_code == 0
    manifest = json.loads((run / "run.json").read_text())
    tax = Taxonomy.from_csv(setup["tax"])
    assert Taxonomy.from_csv(run / "category_names.csv").fingerprint == tax.fingerprint
    assert manifest["taxonomy"]["fingerprint"] == tax.fingerprint
    assert (
        manifest["heads"]["router"]["config"]["hidden"] == 4 and "holdout_acc" in manifest["heads"]["router"]["metrics"]
    )
    # Without --taxonomy, from another directory, with the original file gone: the run's copy is used.
    Path(setup["tax"]).rename(tmp_path / "moved.csv")
    monkeypatch.chdir(tmp_path)
    base = ["--train", setup["train"], "--run", str(run), "--hidden", "4", "--epochs", "1"]
    for command in ("train-flat", "train-experts"):
        result = runner.invoke(app, [command, *base])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--features", setup["val"], "--out", "rep"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "report.md").is_file()
    # A run refuses heads of another taxonomy.
    other = tmp_path / "other.csv"
    other.write_text((tmp_path / "moved.csv").read_text() + "99,BRANCH 9,m,l\n")
    result = runner.invoke(app, ["train-experts", *base, "--taxonomy", str(other), "--overwrite"])
    assert result.exit_code == 1 and "labelled with taxonomy" in result.stderr


def test_taxonomy_defaults_to_the_one_the_features_were_made_with(setup: dict[str, str], tmp_path: Path) -> None:
    meta_path = Path(setup["train"]) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "taxonomy_source": setup["tax"]}))
    run = tmp_path / "fresh"
    result = runner.invoke(app, ["train-router", "--train", setup["train"], "--run", str(run), "--hidden", "4"])
    assert result.exit_code == 0, result.output
    meta_path.write_text(json.dumps({**meta, "taxonomy_source": str(tmp_path / "gone.csv")}))
    result = runner.invoke(app, ["train-router", "--train", setup["train"], "--run", str(tmp_path / "other")])
    assert result.exit_code == 1 and "gone.csv) is not there and the run has none; pass --taxonomy" in result.stderr


def test_config_file_and_command_line_overrides(setup: dict[str, str], tmp_path: Path) -> None:
    run = Path(setup["run"]) / "run"
    cfg = tmp_path / "train.toml"
    cfg.write_text('[train]\nsolver = "adamw"\nepochs = 3\nhidden = 4\nweight_decay = 0.05\nwarmup = 0.2\n')
    result = runner.invoke(app, ["train-flat", *args(setup, "--config", str(cfg), "--min-lr-ratio", "0.5")])
    assert result.exit_code == 0, result.output
    training = json.loads((run / "flat" / "meta.json").read_text())["training"]
    # --epochs 2 (from args) beats the file's 3; the file's options beat the defaults.
    assert (training["epochs"], training["weight_decay"], training["warmup"], training["min_lr_ratio"]) == (
        2,
        0.05,
        0.2,
        0.5,
    )
    cfg.write_text("epoch = 3\n")
    result = runner.invoke(app, ["train-flat", *args(setup, "--config", str(cfg), "--overwrite")])
    assert result.exit_code == 1 and "unknown training option(s) epoch; known:" in result.stderr
    cfg.write_text("epochs = [\n")
    result = runner.invoke(app, ["train-flat", *args(setup, "--config", str(cfg), "--overwrite")])
    assert result.exit_code == 1 and "not valid TOML" in result.stderr
    result = runner.invoke(app, ["train-flat", *args(setup, "--c-grid", "0.1,x", "--overwrite")])
    assert result.exit_code == 1 and "--c-grid '0.1,x': expected comma-separated numbers" in result.stderr


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
