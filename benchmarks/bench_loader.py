"""Images/s of the fine-tuning loader (decode + timm's training transform + collate), per DataLoader worker.

The loader is the one ``train-*`` uses on images (:class:`hierclass.data.training.ImageSplit`), with
timm's training transform resolved from the model (random resized crop, flip, colour jitter), on:

* the Cdiscount sample (``train_example.bson``, 180x180 JPEGs) replicated ``--replicate`` times
  into a dump under ``--work`` (so a pass lasts long enough to measure);
* the first ``--products`` products of the Fashion train dump (60x80 JPEGs).

No model runs: this is the rate a training step can be fed at. Each (data, workers) pair is one
full pass after a warm-up pass; img/s per worker is the rate divided by max(1, workers).

    python benchmarks/bench_loader.py --workers 0 1 2 --image-size 128
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def replicated_dump(source: Path, copies: int, out: Path) -> Path:
    """``copies`` copies of every product of ``source`` (new product ids) in one dump."""
    from hierclass.data import open_source, products_of, write_dump

    if out.exists():
        return out
    src = open_source(source, progress=False)
    products = list(products_of(src, range(len(src))))
    step = int(max(p[0] for p in products)) + 1
    write_dump(out, ((pid + k * step, cid, jpegs) for k in range(copies) for pid, cid, jpegs in products))
    return out


def loader_rate(dump: Path, taxonomy: Path, workers: int, image_size: int, batch_size: int, products: int) -> float:
    """Images/s of one pass of the training loader over (the first ``products`` products of) ``dump``."""
    import torch

    from hierclass.data.training import ImageRows, ImageSplit, Pipeline, train_transform
    from hierclass.distributed import Dist
    from hierclass.features import _data_config
    from hierclass.models.backbone import create_backbone
    from hierclass.taxonomy import Taxonomy

    rows = ImageRows.open(dump, Taxonomy.from_csv(taxonomy))
    keep = np.flatnonzero(rows.product_row < products)
    config = _data_config(create_backbone("mobilenetv3_small_050", "none"), image_size, None)
    transform = train_transform(config, augment=True, flip=True, rand_augment=None)
    split = ImageSplit(rows, keep, np.zeros(len(keep), dtype=np.int64), Pipeline(transform, workers, 0))
    order = split.positions(1, np.random.default_rng(0), None, Dist(), 0)
    device = torch.device("cpu")
    for _ in split.batches(order[: batch_size * max(2, workers * 2)], batch_size, device, epoch=0):
        pass  # warm-up: page cache, worker start
    start, n = time.perf_counter(), 0
    for _, target in split.batches(order, batch_size, device, epoch=1):
        n += len(target)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--replicate", type=int, default=10)
    parser.add_argument("--products", type=int, default=2000, help="Fashion products read (all of the Cdiscount copy).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-bench-loader"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cdiscount = replicated_dump(SHARED / "cdiscount" / "train_example.bson", args.replicate, args.work / "cd.bson")
    data = {
        f"Cdiscount sample x{args.replicate}": (cdiscount, SHARED / "cdiscount" / "category_names.csv", 10**9),
        f"Fashion, first {args.products} products": (
            SHARED / "fashion" / "train.bson",
            SHARED / "fashion" / "category_names.csv",
            args.products,
        ),
    }
    print(f"{args.image_size} px, batch {args.batch_size}, load {os.getloadavg()[0]:.1f}")
    for name, (dump, taxonomy, products) in data.items():
        for workers in args.workers:
            rate = loader_rate(dump, taxonomy, workers, args.image_size, args.batch_size, products)
            print(f"{name:32s} workers {workers}: {rate:7.1f} img/s, {rate / max(1, workers):7.1f} per worker"
                  f"  (load {os.getloadavg()[0]:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
