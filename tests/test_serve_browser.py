"""The served page in a real headless browser (Debian's chromium through chromium-driver and selenium)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA
from serve_browser import classify_in_browser, missing, served
from test_predictor import image_run

from hierclass.data import open_source
from hierclass.run import Run


def real_photo(tmp_path: Path) -> Path:
    """A real product photo: the first of Fashion's validation dump, else of the committed JPEG fixture dump."""
    dump = SHARED_DATA / "fashion" / "val.bson"
    if not dump.is_file():
        dump = REPO / "tests" / "fixtures" / "jpeg_sample.bson"
    photo = tmp_path / "product.jpg"
    photo.write_bytes(open_source(dump, progress=False).read_images(0)[0])
    return photo


def test_page_classifies_a_photo_in_chromium(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    why = missing()
    if why is not None:
        pytest.skip(f"no browser to test the page in: {why}")
    run_dir = image_run(tmp_path_factory)[0]
    photo = real_photo(tmp_path)
    shot = tmp_path / "page.png"
    with served(run_dir, "--topk", "4") as server:
        ranked = classify_in_browser(server.url, [photo], shot)
    expected = Run.load(run_dir).predict_images([photo], topk=4)[0]
    assert [r["category_id"] for r in ranked] == [leaf.category_id for leaf in expected.leaves]
    assert [r["path"] for r in ranked] == [list(leaf.path) for leaf in expected.leaves]
    for shown, leaf in zip(ranked, expected.leaves, strict=True):
        assert shown["probability"] == pytest.approx(leaf.probability, abs=2e-6)
        assert shown["percent"].endswith("%")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
