"""Feature-extraction throughput: eager torch vs ONNX Runtime, in one run on the same images.

Runs :func:`hierclass.features.extract_features` end to end (read the dump, decode JPEG,
resize, backbone, write float16 features) once per engine on the first ``--limit`` images of
a dump, plus the backbone alone on a fixed random batch, and prints images/s::

    .venv/bin/python benchmarks/bench_features.py                      # fashion val, 2000 images, 128 px
    .venv/bin/python benchmarks/bench_features.py --limit 0 --workers 1   # the whole dump
    .venv/bin/python benchmarks/bench_features.py --engines onnx,onnx-spin  # ORT threads not spinning / spinning

``onnx-spin`` is ONNX Runtime with its default spin-waiting intra-op threads (hierclass turns
spinning off; see ``hierclass.onnx_runtime.OnnxBackbone``).

Not a test: the numbers depend on the machine and on what else runs on it (the load
average is printed with them).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hierclass.features
from hierclass.data import open_source
from hierclass.features import FeatureExtractor, extract_features
from hierclass.onnx_runtime import OnnxBackbone, usable_cores

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion"


class FirstProducts:
    """The first ``n`` products of an image source (enough to hold ``limit`` images)."""

    def __init__(self, source: object, limit: int) -> None:
        counts = np.asarray(source.n_images)
        n = len(counts) if limit <= 0 else int(np.searchsorted(np.cumsum(counts), limit) + 1)
        self.source = source
        self.path = source.path
        self.product_ids = np.asarray(source.product_ids)[:n]
        self.category_ids = np.asarray(source.category_ids)[:n]
        self.n_images = counts[:n]

    def __len__(self) -> int:
        return len(self.product_ids)

    def read_images(self, p: int) -> list[bytes]:
        return self.source.read_images(p)


@contextlib.contextmanager
def ort_spinning(on: bool):
    """Build FeatureExtractor's ONNX Runtime sessions with intra-op spinning on or off."""
    hierclass.features.OnnxBackbone = functools.partial(OnnxBackbone, spinning=on)
    try:
        yield
    finally:
        hierclass.features.OnnxBackbone = OnnxBackbone


def model_only(backbone: str, pretrained: str, engine: str, image_size: int, batch_size: int, repeats: int) -> float:
    """Images/s of the backbone alone on one random batch (after a warm-up pass)."""
    extractor = FeatureExtractor(backbone, pretrained, engine=engine, image_size=image_size)
    pixels = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8)
    images = pixels.permute(0, 3, 1, 2)  # uint8 channels last, as the datasets' collate gives
    extractor(images)
    start = time.perf_counter()
    for _ in range(repeats):
        extractor(images)
    return repeats * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "val.bson")
    parser.add_argument("--taxonomy", type=Path, default=SHARED / "category_names.csv")
    parser.add_argument("--limit", type=int, default=2000, help="images to extract (0: all)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--pretrained", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--engines", default="torch,onnx")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: not found; pass --data DUMP (the fashion dumps live in ../shared/data)")

    source = FirstProducts(open_source(args.data, progress=False), args.limit)
    n_images = int(source.n_images.sum())
    print(
        f"{args.backbone} ({args.pretrained}) at {args.image_size} px, batch {args.batch_size}, "
        f"workers {args.workers}, {usable_cores()} cores, torch threads {torch.get_num_threads()}, "
        f"{n_images} images of {args.data.name}; load average before: {os.getloadavg()[0]:.2f}"
    )
    print(f"{'engine':<9} {'end-to-end img/s':>15} {'setup s':>8} {'model-only img/s':>17}")
    for name in args.engines.split(","):
        engine, spin = name.removesuffix("-spin"), name.endswith("-spin")
        with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp, ort_spinning(spin):
            store = extract_features(
                source,
                args.taxonomy,
                args.backbone,
                args.pretrained,
                Path(tmp) / "features",
                engine=engine,
                image_size=args.image_size,
                batch_size=args.batch_size,
                workers=args.workers,
                progress=False,
            )
            run = store.meta["last_run"]
            alone = model_only(args.backbone, args.pretrained, engine, args.image_size, args.batch_size, repeats=5)
        print(f"{name:<9} {run['images_per_s']:>15.1f} {run['setup_seconds']:>8.1f} {alone:>17.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
