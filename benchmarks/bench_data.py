"""Benchmark the dump readers on the real data (a script, not a test).

    .venv/bin/python benchmarks/bench_data.py [--data ../shared/data] [--work /tmp/hierclass-bench]

(a) index build MB/s against a plain sequential read of the same file, both on a warm page
    cache (the file is read once before either is timed; best of --repeat runs each);
(b) images/s of random-access read + JPEG decode + resize to tensors (ImageDataset) in one
    process against a bare loop that only decodes the same JPEG bytes with Pillow;
(c) the same ImageDataset through a DataLoader with 2 worker processes.

The >= 1 GB dump is made by concatenating the real dumps and written under --work (never
into the repository).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hierclass.data import ImageDataset, collate_images, image_rows, open_source, resolve_transform, scan_dump

REPO = Path(__file__).resolve().parents[1]


def sequential_read(path: Path, chunk: int = 1 << 24) -> int:
    """Read the whole file in 16 MiB chunks into one reused buffer; return the bytes read."""
    buf = bytearray(chunk)
    total = 0
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def make_big_dump(parts: list[Path], out: Path, min_bytes: int) -> Path:
    """Concatenate ``parts`` round-robin until the file holds at least ``min_bytes``."""
    if out.exists() and out.stat().st_size >= min_bytes:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as f:
        while f.tell() < min_bytes:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
    os.replace(tmp, out)
    return out


def bench_index(path: Path, repeat: int) -> dict:
    size = path.stat().st_size
    sequential_read(path)  # warm the page cache for both measurements
    t_read = best(lambda: sequential_read(path), repeat)
    t_index = best(lambda: scan_dump(path, progress=False), repeat)
    n = len(scan_dump(path, progress=False))
    return {
        "file": path.name,
        "MB": size / 1e6,
        "products": n,
        "read_MBps": size / t_read / 1e6,
        "index_MBps": size / t_index / 1e6,
        "ratio": t_read / t_index,
    }


def bench_images(source_path: Path, work: Path, n_images: int, image_size: int, batch: int) -> dict:
    torch.set_num_threads(1)  # one core per process, so 1 process vs 2 workers is a fair comparison
    source = open_source(source_path, cache_dir=work / "cache", progress=False)
    product_row, image_number = image_rows(source)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(product_row), size=n_images, replace=n_images > len(product_row))
    transform = resolve_transform("tf_efficientnet_lite0", image_size=image_size)
    ds = ImageDataset(source, transform, product_row[pick], image_number[pick])
    jpegs = [source.read_images(int(product_row[i]))[int(image_number[i])] for i in pick]

    def bare() -> None:
        for data in jpegs:
            Image.open(io.BytesIO(data)).convert("RGB")

    def ours() -> None:
        for i in range(len(ds)):
            ds[i]

    def ours_no_resize() -> None:
        plain = ImageDataset(source, None, ds.product_row, ds.image_number)
        for i in range(len(plain)):
            plain[i]

    def workers() -> None:
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch, num_workers=2, collate_fn=collate_images, persistent_workers=False
        )
        for _ in loader:
            pass

    ours()  # warm
    t_bare, t_ours, t_plain = best(bare, 3), best(ours, 3), best(ours_no_resize, 3)
    t_workers = best(workers, 3)
    return {
        "file": source_path.name,
        "images": n_images,
        "bare_decode_ips": n_images / t_bare,
        "dataset_1proc_ips": n_images / t_ours,
        "dataset_1proc_no_resize_ips": n_images / t_plain,
        "dataloader_2workers_ips": n_images / t_workers,
        "ratio_1proc_vs_bare": t_bare / t_ours,
        "ratio_no_resize_vs_bare": t_bare / t_plain,
        "ratio_2workers_vs_1proc": t_ours / t_workers,
        "image_size": image_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-bench"))
    parser.add_argument("--big-gb", type=float, default=1.0, help="size of the replicated dump")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--images", type=int, default=2000, help="images per image-throughput run")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    sample = args.data / "cdiscount" / "train_example.bson"
    fashion = args.data / "fashion" / "train.bson"
    big = make_big_dump([fashion, sample], args.work / "big.bson", int(args.big_gb * 1e9))
    big_cdiscount = make_big_dump([sample], args.work / "big_cdiscount.bson", int(args.big_gb * 1e9))
    print(f"cpus {os.cpu_count()}  load average {os.getloadavg()[0]:.2f} (other jobs share this machine)")
    print("\n(a) index build vs sequential read, warm page cache, best of", args.repeat)
    print(f"{'file':24s} {'MB':>8s} {'products':>9s} {'read MB/s':>10s} {'index MB/s':>11s} {'ratio':>6s}")
    for path in (sample, fashion, big, big_cdiscount):
        r = bench_index(path, args.repeat)
        print(
            f"{r['file']:24s} {r['MB']:8.1f} {r['products']:9d} {r['read_MBps']:10.0f} "
            f"{r['index_MBps']:11.0f} {r['ratio']:6.2f}"
        )
    print(f"\n(b, c) images/s, {args.images} random images, tf_efficientnet_lite0 eval transform, {args.image_size}px")
    for path in (sample, fashion):
        r = bench_images(path, args.work, args.images, args.image_size, args.batch)
        print(
            f"{r['file']:24s} bare decode {r['bare_decode_ips']:7.0f}  dataset 1 proc {r['dataset_1proc_ips']:7.0f} "
            f"(x{r['ratio_1proc_vs_bare']:.2f})  no resize {r['dataset_1proc_no_resize_ips']:7.0f} "
            f"(x{r['ratio_no_resize_vs_bare']:.2f})  2 workers {r['dataloader_2workers_ips']:7.0f} "
            f"(x{r['ratio_2workers_vs_1proc']:.2f} of 1 proc)"
        )


if __name__ == "__main__":
    main()
