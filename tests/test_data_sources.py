"""Random access, catalogues, datasets, DataLoader workers and splits."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import bson
import numpy as np
import pytest
import torch
from PIL import Image

from hierclass.data import (
    BsonDump,
    CsvCatalogue,
    FolderCatalogue,
    ImageDataset,
    ImageSource,
    ProductDataset,
    collate_images,
    decode_image,
    image_rows,
    import_catalogue,
    make_jpeg,
    open_source,
    resolve_transform,
    split_products,
    synthetic_products,
    to_uint8_tensor,
    write_dump,
)
from hierclass.errors import DumpError


@pytest.fixture
def sample(cdiscount_sample_bson: Path, tmp_path: Path) -> BsonDump:
    source = open_source(cdiscount_sample_bson, cache_dir=tmp_path, progress=False)
    assert isinstance(source, BsonDump)
    return source


@pytest.fixture
def jpegs(jpeg_sample_bson: Path, tmp_path: Path) -> BsonDump:
    """The real sample, else the committed synthetic one: the decode and resize comparisons run on a fresh clone."""
    source = open_source(jpeg_sample_bson, cache_dir=tmp_path, progress=False)
    assert isinstance(source, BsonDump) and len(source) >= 12
    return source


def test_committed_jpeg_sample_is_what_the_script_makes(tmp_path: Path) -> None:
    """tests/fixtures/jpeg_sample.bson and its generator agree (regenerate it with the script after a change)."""
    from fixtures.make_fixtures import JPEG_SAMPLE, jpeg_sample_products

    committed = open_source(JPEG_SAMPLE, cache_dir=tmp_path, progress=False)
    made = jpeg_sample_products()
    assert committed.product_ids.tolist() == [p[0] for p in made]
    assert committed.category_ids.tolist() == [p[1] for p in made]

    def looks(data: bytes) -> tuple:
        with Image.open(io.BytesIO(data)) as im:
            return im.size, im.mode, bool(im.info.get("progressive"))

    assert [looks(committed.read_images(p)[0]) for p in range(len(committed))] == [looks(p[2][0]) for p in made]
    assert JPEG_SAMPLE.stat().st_size < 40_000


# ---------------------------------------------------------------------- random access on the real sample
def test_random_access_equals_sequential_decode(sample: BsonDump) -> None:
    with sample.path.open("rb") as f:
        docs = list(bson.decode_file_iter(f))
    assert isinstance(sample, ImageSource) and len(sample) == 82
    for p in np.random.default_rng(0).permutation(len(sample)):  # any order
        assert sample.read_document(int(p)) == docs[p]
        assert sample.read_images(int(p)) == [img["picture"] for img in docs[p]["imgs"]]
    assert sample.product_ids.dtype == np.int64 and sample.category_ids.dtype == np.int64


def test_image_dataset_real_images_are_180(sample: BsonDump) -> None:
    product_row, image_number = image_rows(sample)
    assert len(product_row) == 110 and image_number.max() == 3
    ds = ImageDataset(sample, None, product_row, image_number)
    for i in range(0, len(ds), 7):
        image, j = ds[i]
        assert j == i and image.shape == (3, 180, 180) and image.dtype == torch.uint8


def test_image_rows_of_some_products(sample: BsonDump) -> None:
    products = np.array([5, 0])
    product_row, image_number = image_rows(sample, products)
    expected = [(p, k) for p in products for k in range(sample.n_images[p])]
    assert list(zip(product_row.tolist(), image_number.tolist(), strict=True)) == expected


def test_resolve_transform_and_product_dataset(sample: BsonDump) -> None:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    transform = resolve_transform(model, image_size=64)
    dataset = ProductDataset(sample, transform)
    images, p = dataset[int(np.argmax(sample.n_images))]
    assert (
        len(images) == 4 and images[0].shape == (3, 90, 90) and images[0].dtype == torch.uint8
    )  # drafted: 180 >= 2 x 73
    batch = dataset.collate([dataset[q] for q in (0, p)])  # resized and cropped per batch
    assert batch[0].shape == (5, 3, 64, 64) and batch[1].tolist() == [0, p, p, p, p] and batch[2].tolist() == [0, p]
    normalised = transform.normalize(batch[0])
    assert normalised.dtype == torch.float32 and normalised.shape == (5, 3, 64, 64)


@pytest.mark.parametrize(
    ("size", "crop_mode", "interpolation"),
    [(128, "center", "bicubic"), (224, "center", "bicubic"), (96, "squash", "bilinear"), (64, "border", "bicubic")],
)
def test_eval_transform_matches_timm(jpegs: BsonDump, size: int, crop_mode: str, interpolation: str) -> None:
    """uint8 resize + crop per batch (images of several sizes), normalise per batch == timm's float eval
    transform on Pillow-decoded images, to a pixel level."""
    import timm.data

    cfg = {"input_size": (3, size, size), "interpolation": interpolation, "crop_pct": 0.875, "crop_mode": crop_mode}
    cfg |= {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    reference = timm.data.create_transform(**cfg, is_training=False)
    ours = resolve_transform(cfg)
    images = [jpegs.read_images(p)[0] for p in range(min(20, len(jpegs)))]
    images += [make_jpeg(3, size=(40, 90)), make_jpeg(4, size=(300, 120))]
    expected = torch.stack([reference(Image.open(io.BytesIO(d)).convert("RGB")) for d in images])
    got = ours.normalize(ours.batch([to_uint8_tensor(decode_image(d, ours.draft_size)) for d in images]))
    assert got.shape == expected.shape == (len(images), 3, size, size)
    one_level = 1 / (255 * min(cfg["std"]))
    assert (got - expected).abs().max() <= 2.01 * one_level  # rounding of the two resize passes
    assert (got - expected).abs().mean() <= 0.05 * one_level


def test_draft_decoding_of_large_jpegs_is_close(eval_config) -> None:
    """A JPEG at least twice the resize target is decoded at a reduced scale: nearly the same pixels."""
    import timm.data

    cfg = eval_config(64)
    ours = resolve_transform(cfg)
    y, x = np.mgrid[0:400, 0:300]
    pixels = np.stack([x * 255 // 300, y * 255 // 400, (x + y) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    data = buffer.getvalue()
    assert ours.draft_size(300, 400) == (73, 97)
    drafted = decode_image(data, ours.draft_size)
    assert drafted.shape == (100, 75, 3)  # decoded at 1/4 scale
    expected = timm.data.create_transform(**cfg, is_training=False)(Image.fromarray(decode_image(data)))
    got = ours.normalize(ours(to_uint8_tensor(drafted))[None])[0]
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.995 and (got - expected).abs().mean() < 0.05


def test_dataloader_two_workers(sample: BsonDump) -> None:
    pickle.loads(pickle.dumps(sample))  # what a spawn-started worker gets: no open handle inside
    sample.read_images(0)  # the parent holds a handle; forked workers must open their own
    ds = ImageDataset(sample)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, collate_fn=collate_images, shuffle=True)
    seen = []
    for images, index, bad in loader:
        assert images.shape[1:] == (3, 180, 180) and len(bad) == 0
        seen += index.tolist()
    assert sorted(seen) == list(range(110))


def test_dataloader_two_workers_resize_per_batch(sample: BsonDump, eval_config) -> None:
    """The batch geometry runs in the workers' collate: the same batches as in one process."""
    transform = resolve_transform(eval_config(64))
    ds = ImageDataset(sample, transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, collate_fn=ds.collate)
    batches = list(loader)
    assert all(images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64) for images, _, _ in batches)
    one_process = ds.collate([ds[i] for i in range(16)])[0]
    assert torch.equal(batches[0][0], one_process) and torch.equal(batches[0][0][3], transform(ds[3][0]))


# ---------------------------------------------------------------------- decoding
def _encoded(mode: str, fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([x * 6, y * 8, (x + y) * 3], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_decode_gives_pillows_pixels(jpegs: BsonDump) -> None:
    """libjpeg-turbo through simplejpeg decodes product JPEGs to exactly Pillow's pixels; other
    formats and JPEGs it cannot make RGB (CMYK) go to Pillow."""
    step = max(1, len(jpegs) // 20)  # 21 of the real sample's 82 products, all 12 of the synthetic one
    for data in [data for p in range(0, len(jpegs), step) for data in jpegs.read_images(p)]:
        assert np.array_equal(decode_image(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    for mode, fmt in [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("P", "PNG"), ("RGBA", "WEBP")]:
        data = _encoded(mode, fmt)
        pixels = decode_image(data)
        assert pixels.shape == (30, 40, 3) and pixels.dtype == np.uint8, (mode, fmt)
        assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))), (mode, fmt)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],
        lambda d: d[:2] + b"\x00" * 40,
        lambda d: b"",
        lambda d: d[:600] + bytes(300) + d[900:],
    ],
    ids=["truncated", "header-garbage", "empty", "zeroed-scan"],
)
def test_decode_damaged_jpeg_gets_pillows_verdict(jpegs: BsonDump, damage) -> None:
    """What libjpeg-turbo rejects, Pillow decides: None exactly when Pillow cannot decode it either
    (truncated data, garbage), the image Pillow gives otherwise (libjpeg warnings Pillow tolerates)."""
    data = damage(jpegs.read_images(0)[0])
    try:
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (OSError, ValueError, SyntaxError):
        expected = None
    got = decode_image(data)
    assert (got is None) == (expected is None) and (expected is None or np.array_equal(got, expected))
    if damage(b"0123456789") == b"01234":  # truncated: both must call it bad
        assert got is None


# ---------------------------------------------------------------------- corrupt images
def test_corrupt_images_are_none_and_dropped_by_collate(tmp_path: Path) -> None:
    good = make_jpeg(1)
    products = [(1, 10, [good, good[: len(good) // 2]]), (2, 10, [b"not an image"]), (3, 11, [good])]
    dump = tmp_path / "d.bson"
    write_dump(dump, products)
    ds = ImageDataset(open_source(dump, progress=False))
    items = [ds[i] for i in range(len(ds))]
    assert [t is None for t, _ in items] == [False, True, True, False]
    images, index, bad = collate_images(items)
    assert images.shape == (2, 3, 24, 32) and index.tolist() == [0, 3] and bad.tolist() == [1, 2]
    images, index, bad = collate_images(items[1:3])
    assert images.shape[0] == 0 and len(index) == 0 and bad.tolist() == [1, 2]
    assert len(ProductDataset(ds.source)[0][0]) == 1 and ProductDataset(ds.source)[1][0] == []


# ---------------------------------------------------------------------- writing and catalogues
def test_write_dump_round_trip_and_atomic(tmp_path: Path) -> None:
    products = synthetic_products(7, max_images=4)
    products.append((99, None, [make_jpeg(5)]))
    dump = tmp_path / "out.bson"
    assert write_dump(dump, products) == 8
    source = open_source(dump, progress=False)
    assert source.product_ids.tolist() == [p for p, _, _ in products]
    assert source.category_ids.tolist() == [c for _, c, _ in products[:-1]] + [-1]
    assert all(source.read_images(k) == products[k][2] for k in range(8))

    def failing():
        yield products[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_dump(dump, failing())
    assert len(open_source(dump, progress=False)) == 8  # the old file is intact
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out.bson", "out.bson.idx.npz"]


def _files(root: Path) -> dict[str, bytes]:
    files = {"a/1.jpg": make_jpeg(1), "a/2.jpg": make_jpeg(2), "b/3.png": b"", "b/4.jpg": make_jpeg(4)}
    png = root / "tmp.png"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(png)
    files["b/3.png"] = png.read_bytes()
    png.unlink()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_csv_catalogue_one_image_per_product(tmp_path: Path) -> None:
    files = _files(tmp_path)
    csv = tmp_path / "cat.csv"
    csv.write_text("path,category_id\n" + "".join(f"{n},{7 + k}\n" for k, n in enumerate(files)))
    source = open_source(csv)
    assert isinstance(source, CsvCatalogue) and isinstance(source, ImageSource)
    assert source.product_ids.tolist() == [0, 1, 2, 3] and source.category_ids.tolist() == [7, 8, 9, 10]
    assert [source.read_images(p) for p in range(4)] == [[d] for d in files.values()]
    assert ImageDataset(source)[2][0].shape == (3, 6, 8)


def test_csv_catalogue_grouped_by_product_id_and_unlabelled(tmp_path: Path) -> None:
    files = _files(tmp_path)
    names = list(files)
    csv = tmp_path / "cat.csv"
    csv.write_text(
        f"product_id,path,category_id\n5,{names[0]},3\n6,{names[1]},\n5,{names[2]},3\n8,{names[3]},4\n", "utf-8"
    )
    source = open_source(csv)
    assert source.product_ids.tolist() == [5, 6, 8] and source.category_ids.tolist() == [3, -1, 4]
    assert source.n_images.tolist() == [2, 1, 1]
    assert source.read_images(0) == [files[names[0]], files[names[2]]]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("file,category_id\na/1.jpg,1\n", "no 'path' column"),
        ("path,category_id\na/1.jpg,x\n", ":2: category_id 'x' is not an integer"),
        ("path,category_id,product_id\na/1.jpg,1,5\na/2.jpg,2,5\n", ":3: product_id 5 has category_id 2"),
        ("path,category_id\na/1.jpg\n", ":2: 1 field"),
        ("path,category_id\nmissing.jpg,1\n", ":2: image file .*missing.jpg not found"),
    ],
    ids=["no-path", "bad-int", "mixed-category", "short-row", "missing-file-strict"],
)
def test_csv_catalogue_errors(tmp_path: Path, text: str, found: str) -> None:
    _files(tmp_path)
    csv = tmp_path / "cat.csv"
    csv.write_text(text)
    with pytest.raises(DumpError, match=found):
        open_source(csv, strict=True)


def test_csv_catalogue_missing_files_skipped_and_reported(tmp_path: Path) -> None:
    _files(tmp_path)
    csv = tmp_path / "cat.csv"
    csv.write_text("path,category_id\na/1.jpg,1\ngone.jpg,2\na/2.jpg,1\n")
    source = open_source(csv)
    assert source.product_ids.tolist() == [0, 2]
    (line,) = source.problems()
    assert line.startswith(f"{csv}:3: image file") and "1 missing file(s) skipped" in line


def test_folder_catalogue(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for cid, k in [(12, 1), (12, 2), (3, 3)]:
        (root / str(cid)).mkdir(exist_ok=True)
        (root / str(cid) / f"{k}.jpg").write_bytes(make_jpeg(k))
    (root / "12" / "notes.txt").write_text("ignored")
    source = open_source(root)
    assert isinstance(source, FolderCatalogue)
    assert source.category_ids.tolist() == [3, 12, 12] and source.read_images(0) == [make_jpeg(3)]
    (root / "shoes").mkdir()
    with pytest.raises(DumpError, match="'shoes' is not a category_id"):
        open_source(root)


def test_import_catalogue_to_dump(tmp_path: Path) -> None:
    files = _files(tmp_path)
    (tmp_path / "bad.jpg").write_bytes(b"GIF89a broken")
    csv = tmp_path / "cat.csv"
    csv.write_text("path,category_id\n" + "".join(f"{n},1\n" for n in [*files, "bad.jpg"]))
    counts = import_catalogue(csv, tmp_path / "out.bson", progress=False)
    assert counts == {"products": 4, "images": 4, "bad_images": 1, "skipped_products": 1}
    dump = open_source(tmp_path / "out.bson", progress=False)
    assert dump.read_images(0) == [files["a/1.jpg"]]  # JPEGs copied byte for byte
    png_as_jpeg = dump.read_images(2)[0]
    assert png_as_jpeg[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(png_as_jpeg)).size == (8, 6)


# ---------------------------------------------------------------------- splits
def test_split_products_stratified_deterministic() -> None:
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.full(200, 1), np.full(50, 2), np.full(7, 3), [4], np.full(2, 5)])
    rng.shuffle(labels)
    train, val = split_products(labels, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.intersect1d(train, val).size == 0
    assert (labels[val] == 1).sum() == 40 and (labels[val] == 2).sum() == 10
    assert 4 in labels[train] and 4 not in labels[val]  # a single-product leaf stays in train
    assert 5 in labels[train]  # every leaf keeps a train product
    again = split_products(labels, 0.2, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(split_products(labels, 0.2, seed=4)[1], val)
    assert len(split_products(labels, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_products(labels, 1.0)


def test_split_fraction_holds_over_many_small_leaves() -> None:
    labels = np.repeat(np.arange(2000), 3)  # 3 products per leaf: 0.3 expected in val each
    _, val = split_products(labels, 0.1, seed=0)
    assert abs(len(val) / len(labels) - 0.1) < 0.01


def test_holdout_mask_keeps_products_together_and_stratifies() -> None:
    from hierclass.data import holdout_mask

    rng = np.random.default_rng(0)
    product_labels = np.repeat(np.arange(40), 50)  # 40 leaves x 50 products
    images = rng.integers(1, 4, len(product_labels))  # 1-3 images a product
    product = np.repeat(np.arange(len(product_labels)) * 7 + 3, images)
    labels = np.repeat(product_labels, images)
    order = rng.permutation(len(product))
    held = holdout_mask(product[order], labels[order], 0.1, seed=0)
    by_product = {}
    for p, h in zip(product[order], held, strict=True):
        by_product.setdefault(p, set()).add(bool(h))
    assert all(len(v) == 1 for v in by_product.values())  # a product's images never straddle
    held_products = {p for p, v in by_product.items() if True in v}
    per_leaf = np.bincount(product_labels[(np.array(sorted(held_products)) - 3) // 7], minlength=40)
    assert (per_leaf == 5).all()  # 10% of each leaf's 50 products
    assert np.array_equal(holdout_mask(product[order], labels[order], 0.1, seed=0), held)
    assert not np.array_equal(holdout_mask(product[order], labels[order], 0.1, seed=1), held)
    with pytest.raises(ValueError, match="rows"):
        holdout_mask(product, labels[:-1])
