"""Output locations are checked before the work, and operating-system errors are one line."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from test_reliability import one_error_line
from test_report import shared_run
from typer.testing import CliRunner

import hierclass.cli.evaluate as evaluate_cli
from hierclass.atomic import atomic_open
from hierclass.cli import app
from hierclass.errors import OutputError
from hierclass.featurestore import OK, FeatureStore
from hierclass.outputs import check_writable_dir, check_writable_file, os_error_message

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return shared_run(tmp_path_factory)


def _no_work(*args: object, **kwargs: object) -> None:
    raise AssertionError("the work started before the output was checked")


def test_checks_name_the_path_and_the_fix(tmp_path: Path) -> None:
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(OutputError, match=r"f.txt \(--out\): is a file where a folder is expected"):
        check_writable_dir(a_file)
    with pytest.raises(OutputError, match="a part of the path is a file"):
        check_writable_dir(a_file / "sub")
    with pytest.raises(OutputError, match=r"\(--out\): is a folder; pass a file path"):
        check_writable_file(tmp_path)
    with pytest.raises(OutputError, match=r"^/proc \(--out\): cannot create a file there"):
        check_writable_file("/proc/x.csv")
    assert check_writable_dir(tmp_path / "new" / "dir").is_dir() and list((tmp_path / "new" / "dir").iterdir()) == []
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/model.safetensors")
    assert os_error_message(full) == "/data/run/model.safetensors: No space left on device; the disk is full; " + (
        "free some space or write somewhere else"
    )
    assert "read-only" in os_error_message(OSError(errno.EROFS, "Read-only file system", "/mnt/x"), "--out")


def test_a_failed_cleanup_does_not_hide_the_first_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: on a read-only file system the cleanup's unlink raised again (a double chained traceback)."""
    first = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))

    def unlink(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with pytest.raises(OSError) as caught, atomic_open(tmp_path / "x.json") as f:  # noqa: PT012
        f.write("{}")
        monkeypatch.setattr(Path, "unlink", unlink)
        raise first
    assert caught.value is first


def test_predict_checks_out_before_the_work(run: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: all predictions were computed, then IsADirectoryError / PermissionError as a traceback."""
    _, run_dir, val_dir = run
    monkeypatch.setattr(evaluate_cli, "build_models", _no_work)
    base = ["predict", "--run", str(run_dir), "--features", str(val_dir), "--out"]
    assert "is a folder; pass a file path" in one_error_line(runner.invoke(app, [*base, str(val_dir)]))
    assert "/proc (--out): cannot create a file there" in one_error_line(runner.invoke(app, [*base, "/proc/x.csv"]))


def test_evaluate_checks_out_before_the_work(run: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, run_dir, val_dir = run
    monkeypatch.setattr(evaluate_cli, "build_models", _no_work)
    a_file = val_dir / "meta.json"
    line = one_error_line(
        runner.invoke(app, ["evaluate", "--run", str(run_dir), "--features", str(val_dir), "--out", str(a_file)])
    )
    assert "is a file where a folder is expected" in line


def test_a_full_disk_during_predict_is_one_line(
    run: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: OSError [Errno 28] as a traceback after every prediction was computed."""
    _, run_dir, val_dir = run
    out = tmp_path / "sub.csv"

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    import hierclass.report

    monkeypatch.setattr(hierclass.report, "write_predictions", full)  # predict imports it when it runs
    line = one_error_line(
        runner.invoke(app, ["predict", "--run", str(run_dir), "--features", str(val_dir), "--out", str(out)])
    )
    assert line == f"error: {out}: No space left on device; the disk is full; free some space or write somewhere else"


def test_import_into_an_existing_folder(tmp_path: Path) -> None:
    """Before: IsADirectoryError as a traceback, after every image was read."""
    (tmp_path / "cat.csv").write_text("path,category_id\n")
    (tmp_path / "out.bson").mkdir()
    line = one_error_line(
        runner.invoke(app, ["import", str(tmp_path / "cat.csv"), "--out", str(tmp_path / "out.bson")])
    )
    assert "out.bson (--out): is a folder" in line


def test_topk_beyond_the_leaves_is_clamped(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Before: ValueError as a traceback after all predictions were computed."""
    tax_csv, run_dir, val_dir = run
    out = tmp_path / "sub.csv"
    result = runner.invoke(
        app, ["predict", "--run", str(run_dir), "--features", str(val_dir), "--out", str(out), "--topk", "50"]
    )
    assert result.exit_code == 0, result.output
    assert "--topk 50 is more than the taxonomy's 14 leaves; using 14" in result.stderr
    assert "top14_prob" in out.read_text().splitlines()[0]


def test_calibrate_on_unlabelled_features(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, run_dir, val_dir = run
    val = FeatureStore.open(val_dir)
    unlabelled = tmp_path / "unlabelled"
    store = FeatureStore.create(
        unlabelled, dim=val.dim, product_id=val.product_id, image_number=val.image_number,
        leaf=np.full(len(val.product_id), -1), meta=val.meta,
    )  # fmt: skip
    rows = np.arange(len(val.product_id))
    store.write(rows, {"orig": np.asarray(val.features("orig"))}, OK)
    store.mark_complete()
    args = ["predict", "--run", str(run_dir), "--features", str(val_dir), "--out", str(tmp_path / "s.csv")]
    line = one_error_line(runner.invoke(app, [*args, "--calibrate", str(unlabelled)]))
    assert "no labelled image to calibrate on" in line


def test_a_full_disk_during_the_onnx_export_is_not_blamed_on_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: "ONNX export failed (...); use --engine torch", which would fail on the same full disk."""
    import torch

    from hierclass.onnx_runtime import OnnxExportError, export_onnx

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2)).eval()
    with pytest.raises(OnnxExportError) as caught:
        export_onnx(model, tmp_path / "b.onnx", (3, 4, 4), {}, (0.5,) * 3, (0.5,) * 3)
    assert "the disk is full" in str(caught.value) and "--engine torch" not in str(caught.value)
