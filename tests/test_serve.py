"""The HTTP API of ``hierclass serve`` through FastAPI's test client: answers, bad requests, concurrency."""

from __future__ import annotations

import asyncio
import csv
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_predictor import image_run
from typer.testing import CliRunner

pytest.importorskip("fastapi", reason="hierclass serve needs fastapi (pip install -e '.[dev]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (pip install -e '.[dev]')")

from fastapi.testclient import TestClient  # noqa: E402

from hierclass.cli import app as cli  # noqa: E402
from hierclass.run import Run  # noqa: E402
from hierclass.server import MicroBatcher, ServeConfig, create_app  # noqa: E402

runner = CliRunner()
JPEG = "image/jpeg"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return image_run(tmp_path_factory)


@pytest.fixture(scope="module")
def client(run: tuple[Path, Path, Path]) -> TestClient:
    app = create_app(Run.load(run[0]), ServeConfig(max_upload_mb=0.25, max_images=8))
    with TestClient(app) as c:
        yield c


def upload(*files: tuple[str, bytes], field: str = "image") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (name, data, JPEG)) for name, data in files]


def test_answers_equal_predict(run: tuple[Path, Path, Path], client: TestClient, tmp_path: Path) -> None:
    run_dir, dump, images = run
    files = sorted(images.glob("*.jpg"))[:6]
    out = tmp_path / "sub.csv"
    args = ["predict", "--run", str(run_dir), "--out", str(out), "--topk", "5"]
    result = runner.invoke(cli, [*args, *[a for f in files for a in ("--data", str(f))]])
    assert result.exit_code == 0, result.output
    expected = list(csv.DictReader(out.open()))
    for f, row in zip(files, expected, strict=True):
        response = client.post("/predict", files=upload((f.name, f.read_bytes())))
        assert response.status_code == 200, response.text
        body = response.json()
        assert [p["category_id"] for p in body["predictions"]] == [int(row[f"top{i}_category_id"]) for i in range(1, 6)]
        for i, p in enumerate(body["predictions"], 1):
            assert p["path"] == [row[f"top{i}_level{j}"] for j in (1, 2, 3)]
            assert p["probability"] == pytest.approx(float(row[f"top{i}_prob"]), abs=2e-6)
        assert body["level1"][0]["probability"] >= body["level1"][-1]["probability"]
        assert sum(b["probability"] for b in body["level1"]) == pytest.approx(1.0, abs=1e-4)
        assert body["model"]["backbone"] == "test_efficientnet" and body["ms"] > 0 and body["images"] == 1
    # a product's photos in one request: predict's answer for that product of the dump
    sub = tmp_path / "dump.csv"
    result = runner.invoke(
        cli, ["predict", "--run", str(run_dir), "--data", str(dump), "--out", str(sub), "--topk", "3"]
    )
    assert result.exit_code == 0, result.output
    first = next(csv.DictReader(sub.open()))
    photos = [(f.name, f.read_bytes()) for f in (images / "p0-0.jpg", images / "p0-1.jpg")]
    body = client.post("/predict", files=upload(*photos), params={"topk": 3}).json()
    assert [p["category_id"] for p in body["predictions"]] == [int(first[f"top{i}_category_id"]) for i in (1, 2, 3)]
    assert body["predictions"][0]["probability"] == pytest.approx(float(first["top1_prob"]), abs=2e-6)
    assert body["images"] == 2


def test_abstention(client: TestClient, run: tuple[Path, Path, Path]) -> None:
    photo = upload(("a.jpg", (run[2] / "p3-0.jpg").read_bytes()))
    body = client.post("/predict", files=photo, params={"abstain": 1.0}).json()
    assert body["abstain_threshold"] == 1.0 and body["depth"] in (1, 2)
    assert client.post("/predict", files=photo, params={"abstain": 0.0}).json()["depth"] == 3
    assert "depth" not in client.post("/predict", files=photo).json()


def test_bad_requests_are_one_line_4xx(client: TestClient, run: tuple[Path, Path, Path]) -> None:
    good = (run[2] / "p3-0.jpg").read_bytes()
    cases = {
        "not an image": (dict(files=upload(("notes.jpg", b"just some text"))), 422, "not a decodable image"),
        "truncated JPEG": (dict(files=upload(("cut.jpg", good[: len(good) // 2]))), 422, "truncated"),
        "0-byte file": (dict(files=upload(("empty.jpg", b""))), 422, "empty (0 bytes)"),
        "over the limit": (dict(files=upload(("big.jpg", good + b"\0" * 300_000))), 413, "over 0.25 MB"),
        "wrong field": (dict(files=upload(("a.jpg", good), field="file")), 422, "no field 'image'"),
        "9 images": (dict(files=upload(*[(f"{i}.jpg", good) for i in range(9)])), 422, "more than 8 images"),
        "50 images": (dict(files=upload(*[(f"{i}.jpg", b"x") for i in range(50)])), 422, "more than 8 images"),
        "no upload": (dict(json={"image": "a.jpg"}), 415, "multipart/form-data"),
        "text field": (dict(data={"image": "a.jpg"}, files=upload(("x", b"x"), field="other")), 422, "holds text"),
        "bad topk": (dict(files=upload(("a.jpg", good)), params={"topk": 0}), 422, "topk=0"),
        "bad abstain": (dict(files=upload(("a.jpg", good)), params={"abstain": 2}), 422, "abstain=2"),
    }
    for what, (kwargs, status, words) in cases.items():
        response = client.post("/predict", **kwargs)
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert words in error and "\n" not in error and set(response.json()) == {"error"}, (what, error)
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405
    # the server keeps serving, and the refused requests did not leave the batcher waiting for them
    assert client.post("/predict", files=upload(("a.jpg", good))).status_code == 200
    assert client.app.state.batcher._coming == 0


def test_uploads_stay_in_memory(run: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1.5 MB upload (over the parser's usual 1 MB spool) is not written to a temporary file."""
    import starlette.formparsers

    made = []

    class Watched(starlette.formparsers.SpooledTemporaryFile):  # type: ignore[misc,name-defined]
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            made.append(self)

        def close(self) -> None:
            self.rolled_at_close = self._rolled
            super().close()

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Watched)
    app = create_app(Run.load(run[0]), ServeConfig(max_upload_mb=3))
    photo = (run[2] / "p3-0.jpg").read_bytes() + b"\0" * 1_500_000  # bytes after the JPEG's end are ignored
    response = TestClient(app).post("/predict", files=upload(("large.jpg", photo)))
    assert response.status_code == 200, response.text
    assert len(made) == 1 and made[0].rolled_at_close is False


def _without_probability(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "probability"} for e in entries]


def test_concurrent_requests(client: TestClient, run: tuple[Path, Path, Path]) -> None:
    files = sorted(run[2].glob("*.jpg"))[:8]
    alone = {f.name: client.post("/predict", files=upload((f.name, f.read_bytes()))).json() for f in files}
    batcher = client.app.state.batcher
    before = (batcher.requests, batcher.batches)

    def ask(f: Path) -> tuple[str, dict]:
        response = client.post("/predict", files=upload((f.name, f.read_bytes())))
        assert response.status_code == 200, response.text
        return f.name, response.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, files * 4))
    for name, body in answers:  # the same answers; a batch's float sums may differ in the last digit
        for key in ("predictions", "level1"):
            assert _without_probability(body[key]) == _without_probability(alone[name][key])
            assert [p["probability"] for p in body[key]] == pytest.approx(
                [p["probability"] for p in alone[name][key]], abs=2e-6
            )
    requests, batches = batcher.requests - before[0], batcher.batches - before[1]
    assert requests == 32 and batches < requests  # requests waiting while a batch ran joined the next one


def test_micro_batcher_joins_requests_on_their_way(run: tuple[Path, Path, Path]) -> None:
    """Requests announced together share one backbone pass; each gets its own answer."""
    loaded = Run.load(run[0])
    predictor = loaded.image_predictor()
    images = [predictor.decode((run[2] / f"p{p}-0.jpg").read_bytes()) for p in (3, 4, 5)]
    batcher = MicroBatcher(predictor, wait_ms=2000, max_images=64)
    for _ in images:
        batcher.announce()

    async def all_three() -> list:
        return await asyncio.gather(*(batcher.predict([im], [f"{i}"], 3, None) for i, im in enumerate(images)))

    answers = asyncio.run(all_three())
    batcher.close()
    assert (batcher.requests, batcher.batches) == (3, 1)
    expected = loaded.predict_images([run[2] / f"p{p}-0.jpg" for p in (3, 4, 5)], topk=3)
    assert [a.leaves for a in answers] == [e.leaves for e in expected]


def test_model_health_and_page(client: TestClient, run: tuple[Path, Path, Path]) -> None:
    model = client.get("/model").json()
    assert model["backbone"] == "test_efficientnet" and model["image_size"] == 32 and model["cut"] == "pooled features"
    assert model["taxonomy"] == {
        "fingerprint": Run.load(run[0]).taxonomy.fingerprint,
        "leaves": 14,
        "level1": 4,
        "level2": 7,
    }
    assert set(model["validation"]) == {"router", "experts"} and "val_acc" in model["validation"]["router"]
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<input id="file" name="image" type="file"' in html and 'id="ranked"' in html and 'id="level1"' in html
    assert "<script src" not in html and "<link" not in html  # one self-contained page
    json.dumps(model)  # JSON all the way down


def test_serve_command_errors(run: tuple[Path, Path, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(cli, ["serve", "--run", str(run[0]), "--port", str(port)])
    assert result.exit_code == 1 and f"127.0.0.1:{port}: cannot listen there" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(cli, ["serve", "--run", str(run[0]), "--model", "fused", "--topk", "0"])
    assert result.exit_code == 2 and "--topk" in result.output


def test_serve_command_over_http(run: tuple[Path, Path, Path]) -> None:
    """The command itself: uvicorn on 127.0.0.1, real HTTP, and the run's ONNX export reused, not made again."""
    import httpx
    from serve_browser import served

    run_dir, _, images = run
    photo = (images / "p3-0.jpg").read_bytes()
    expected = Run.load(run_dir).predict_images([photo], topk=2)[0]  # makes the export if no test did yet
    (export,) = (run_dir / "onnx").glob("*.onnx")
    made = export.stat().st_mtime_ns
    with served(run_dir, "--topk", "2") as server:
        assert server.url.startswith("http://127.0.0.1:")
        response = httpx.post(server.url + "predict", files={"image": ("p.jpg", photo, JPEG)}, timeout=60)
        bad = httpx.post(server.url + "predict", files={"image": ("p.jpg", b"", JPEG)}, timeout=60)
        after = httpx.get(server.url + "health", timeout=60)
    assert response.status_code == 200, response.text
    assert [p["category_id"] for p in response.json()["predictions"]] == [leaf.category_id for leaf in expected.leaves]
    assert bad.status_code == 422 and after.json()["status"] == "ok"
    assert export.stat().st_mtime_ns == made and list((run_dir / "onnx").iterdir()) == [export]
