from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hierclass.cli import app

runner = CliRunner()


def test_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "taxonomy" in result.output


def test_taxonomy_stats_real(cdiscount_taxonomy_csv: Path) -> None:
    result = runner.invoke(app, ["taxonomy", "stats", str(cdiscount_taxonomy_csv)])
    assert result.exit_code == 0, result.output
    assert "49 branches" in result.output
    assert "486 nodes (483 distinct names)" in result.output
    assert "5270 (5263 distinct names)" in result.output
    assert "min 1  median 81  max 555" in result.output


def test_taxonomy_show_branch(cdiscount_taxonomy_csv: Path) -> None:
    result = runner.invoke(app, ["taxonomy", "show", str(cdiscount_taxonomy_csv), "--branch", "APICULTURE"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("APICULTURE  [")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "id,a,b,c\n1,x,y,z\n",
        "category_id,category_level1,category_level2,category_level3\n1,a,b,c\n1,a,b,d\n",
        "category_id,category_level1,category_level2,category_level3\nnope,a,b,c\n",
        "category_id,category_level1,category_level2,category_level3\n1,,b,c\n",
    ],
)
def test_bad_file_one_clean_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    result = runner.invoke(app, ["taxonomy", "stats", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert "Traceback" not in result.output


def test_unknown_branch_is_one_clean_line(cdiscount_taxonomy_csv: Path) -> None:
    result = runner.invoke(app, ["taxonomy", "show", str(cdiscount_taxonomy_csv), "--branch", "NOPE"])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "no level-1 branch named 'NOPE'" in result.stderr


# ---------------------------------------------------------------------- start-up, version, -h
HEAVY = ("torch", "timm", "numba")


def _heavy_modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after ``code`` (a subprocess: this one has them all)."""
    import subprocess
    import sys

    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=repo, check=True)
    return done.stdout.split()


def test_cli_import_no_torch() -> None:
    """Every command module leaves torch, timm and numba to its commands."""
    assert _heavy_modules_after("import hierclass.cli") == []
    assert _heavy_modules_after("import hierclass, hierclass.taxonomy, hierclass.defaults, hierclass.config") == []


def test_version() -> None:
    from hierclass import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"hierclass {__version__}"


@pytest.mark.parametrize("command", [[], ["taxonomy"], ["taxonomy", "stats"], ["split"], ["predict"], ["train-flat"]])
def test_h_is_help(command: list[str]) -> None:
    short = runner.invoke(app, [*command, "-h"])
    assert short.exit_code == 0 and "Usage:" in short.output
    assert short.output == runner.invoke(app, [*command, "--help"]).output


@pytest.mark.parametrize(
    "command",
    ["index", "import", "split", "extract-features", "evaluate", "predict", "demo", "train-flat", "train-experts"],
)
def test_long_commands_have_progress_switch(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert "--progress" in result.output and "--no-progress" in result.output
