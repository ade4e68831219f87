"""Benchmark the dump readers on the real data (a script, not a test).

    .venv/bin/python benchmarks/bench_data.py [--data ../shared/data] [--work /tmp/hierclass-bench]

(a) index build MB/s against a plain sequential read of the same file, timed in turn round after
    round, on a warm page cache (the file is read once before either is timed; best of --repeat
    runs each) or with --cold from the disk (the file's pages are dropped from the page cache before
    each run; median of --repeat runs each, as the disk's speed drifts);
(b) images/s of random-access read + JPEG decode + resize/crop to uint8 tensors (ImageDataset with
    the model's EvalTransform: simplejpeg decode per item, torch uint8 antialiased resize + crop per
    batch in ImageDataset.collate) to uint8 batches at the model's input size (the ONNX engine
    normalises inside its graph), in one process, against a bare loop that only decodes the same
    JPEG bytes with Pillow (the two timed in turn, round after round, with (c)); for comparison also
    a bare simplejpeg decode loop, the same with torch's float normalisation per batch (the torch
    engine's path), the previous path (one Pillow resize per image), timm's per-image float
    transform and the dataset without resize.
    With --processes N, (b) alone also runs in N fresh processes, one after the other (bare decode
    and dataset in turn in each), and the ratio is given per process: on machine B (benchmarks/README.md) the bare
    Pillow loop's speed moved by 2x from one process to the next with the address-space layout
    (steady under ``setarch -R``), the dataset's much less;
(c) the same through a DataLoader with 2 persistent worker processes (started and warmed up
    before timing), against (b) in one process, timed in turn round after round; with torch's
    default sharing strategy (file_descriptor) and with file_system.

Timings are only meaningful on an idle machine: --max-load waits (up to --wait seconds) until the
1-minute load average is below it before each part, and every line prints the load it ran at.

The >= 1 GB dump is made by concatenating the real dumps and written under --work (never
into the repository).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

from hierclass.data import ImageDataset, image_rows, open_source, resolve_transform, scan_dump
from hierclass.data import to_uint8_tensor as to_tensor

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


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop the file's cached pages (clean ones go; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_index(path: Path, repeat: int, cold: bool = False) -> dict:
    """Time the plain read and the index pass in turn, round after round (so both see the same
    machine): the best of each on a warm page cache; cold, the median (the disk's speed drifts)."""
    size = path.stat().st_size
    sequential_read(path)  # warm the page cache for both measurements (or compile the scan, cold)
    n = len(scan_dump(path, progress=False))
    times: dict[str, list[float]] = {"read": [], "index": []}
    for _ in range(repeat):
        for name, fn in (("read", lambda: sequential_read(path)), ("index", lambda: scan_dump(path, progress=False))):
            if cold:
                drop_from_page_cache(path)
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    pick = statistics.median if cold else min
    t_read, t_index = pick(times["read"]), pick(times["index"])
    return {
        "file": path.name,
        "MB": size / 1e6,
        "products": n,
        "read_MBps": size / t_read / 1e6,
        "index_MBps": size / t_index / 1e6,
        "ratio": t_read / t_index,
    }


def wait_for_idle(max_load: float, wait: float) -> float:
    """Sleep until the 1-minute load average is below ``max_load`` (at most ``wait`` s); return it."""
    deadline = time.monotonic() + wait
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def image_setup(source_path: Path, work: Path, n_images: int, image_size: int):
    """The dataset of (b) over ``n_images`` random images, its transform and their JPEG bytes."""
    torch.set_num_threads(1)  # one core per process, so 1 process vs 2 workers is a fair comparison
    source = open_source(source_path, cache_dir=work / "cache", progress=False)
    product_row, image_number = image_rows(source)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(product_row), size=n_images, replace=n_images > len(product_row))
    transform = resolve_transform("tf_efficientnet_lite0", image_size=image_size)
    ds = ImageDataset(source, transform, product_row[pick], image_number[pick])
    jpegs = [source.read_images(int(product_row[i]))[int(image_number[i])] for i in pick]
    return source, ds, transform, jpegs


def bare_pillow(jpegs: list[bytes]) -> None:
    """The goal's baseline: only decode the JPEG bytes with Pillow."""
    for data in jpegs:
        Image.open(io.BytesIO(data)).convert("RGB")


def dataset_batches(dataset: ImageDataset, batch: int, normalize=None) -> None:
    for start in range(0, len(dataset), batch):
        images, _, _ = dataset.collate([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
        if normalize is not None:
            normalize(images)


def b_one_process(source_path: Path, work: Path, n_images: int, image_size: int, batch: int, repeat: int) -> dict:
    """(b) alone, in this process: the bare Pillow decode and the dataset in turn, best of ``repeat`` each."""
    _, ds, _, jpegs = image_setup(source_path, work, n_images, image_size)
    dataset_batches(ds, batch)  # warm
    rounds = [(best(lambda: bare_pillow(jpegs), 1), best(lambda: dataset_batches(ds, batch), 1)) for _ in range(repeat)]
    t_bare, t_ours = (min(column) for column in zip(*rounds, strict=True))
    return {"bare_ips": n_images / t_bare, "dataset_ips": n_images / t_ours, "ratio": t_bare / t_ours}


def b_in_fresh_processes(args: argparse.Namespace, image_set: str, n_processes: int) -> list[dict]:
    """(b) in ``n_processes`` fresh processes in turn: where a process's code and buffers land in memory
    (address-space randomisation) moved the bare Pillow loop's speed by 2x on machine B (benchmarks/README.md)."""
    command = [sys.executable, __file__, "--parts", "b-one", "--image-sets", image_set, "--data", str(args.data)]
    command += ["--work", str(args.work), "--images", str(args.images), "--image-size", str(args.image_size)]
    command += ["--batch", str(args.batch), "--repeat", str(args.repeat)]
    runs = []
    for _ in range(n_processes):
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return runs


def bench_images(source_path: Path, work: Path, n_images: int, image_size: int, batch: int, repeat: int) -> dict:
    source, ds, transform, jpegs = image_setup(source_path, work, n_images, image_size)

    def bare() -> None:  # the goal's baseline
        bare_pillow(jpegs)

    def bare_simplejpeg() -> None:  # the fastest bare decode we know, for comparison
        for data in jpegs:
            simplejpeg.decode_jpeg(data, colorspace="RGB")

    def ours() -> None:  # uint8 batches at the model's input size: what the ONNX engine takes
        dataset_batches(ds, batch)

    def ours_float() -> None:  # + torch's float normalisation in this process (what the torch engine does)
        dataset_batches(ds, batch, transform.normalize)

    def pillow_resize() -> None:  # before: one Pillow resize of the crop's box per image (same decode)
        per_image = transform._one_by_pillow  # noqa: SLF001 (the filter fallback, as a per-image transform)
        dataset = ImageDataset(source, lambda im: per_image(to_tensor(im)), ds.product_row, ds.image_number)
        dataset_batches(dataset, batch)

    def timm_float() -> None:  # before: timm's per-image float transform (bicubic resize, to float, normalise)
        import timm.data

        cfg = timm.data.resolve_model_data_config(timm.create_model("tf_efficientnet_lite0", pretrained=False))
        cfg["input_size"] = (3, image_size, image_size)
        dataset_batches(ImageDataset(source, timm.data.create_transform(**cfg), ds.product_row, ds.image_number), batch)

    def no_resize() -> None:  # uint8 tensors at the stored size (which varies: nothing to stack)
        plain = ImageDataset(source, None, ds.product_row, ds.image_number)
        for i in range(len(plain)):
            plain[i]

    def loader(strategy: str):  # 2 persistent workers, started (and warmed up) before timing
        torch.multiprocessing.set_sharing_strategy(strategy)  # how workers hand batches over; read at fork
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch, num_workers=2, collate_fn=ds.collate, persistent_workers=True, prefetch_factor=4
        )

        def workers() -> None:
            for _batch in loader:  # uint8 batches; the ONNX engine normalises inside its graph
                pass

        workers()
        torch.multiprocessing.set_sharing_strategy(default_strategy)
        return workers

    load = os.getloadavg()[0]
    ours()  # warm
    t_sj = best(bare_simplejpeg, repeat)
    t_timm, t_plain, t_pillow = best(timm_float, 1), best(no_resize, 1), best(pillow_resize, 1)
    t_float = best(ours_float, 1)
    # (b) and (c): the bare decode, one process and the two loaders in turn, round after round, so
    # that a slow (or fast) spell of the host falls on all four alike; best of the rounds for each
    default_strategy = torch.multiprocessing.get_sharing_strategy()
    fd_workers, fs_workers = loader(default_strategy), loader("file_system")
    rounds = [(best(bare, 1), best(ours, 1), best(fd_workers, 1), best(fs_workers, 1)) for _ in range(repeat)]
    t_bare, t_ours, t_workers, t_workers_fs = (min(column) for column in zip(*rounds, strict=True))
    return {
        "file": source_path.name,
        "images": n_images,
        "load": (load + os.getloadavg()[0]) / 2,
        "bare_decode_ips": n_images / t_bare,
        "bare_simplejpeg_ips": n_images / t_sj,
        "dataset_1proc_ips": n_images / t_ours,
        "pillow_resize_ips": n_images / t_pillow,
        "dataset_float_ips": n_images / t_float,
        "timm_float_ips": n_images / t_timm,
        "dataset_1proc_no_resize_ips": n_images / t_plain,
        "dataloader_2workers_ips": n_images / t_workers,
        "dataloader_2workers_file_system_ips": n_images / t_workers_fs,
        "sharing_strategy": default_strategy,
        "ratio_1proc_vs_bare": t_bare / t_ours,
        "ratio_1proc_vs_bare_simplejpeg": t_sj / t_ours,
        "ratio_pillow_resize_vs_bare": t_bare / t_pillow,
        "ratio_float_vs_bare": t_bare / t_float,
        "ratio_timm_vs_bare": t_bare / t_timm,
        "ratio_no_resize_vs_bare": t_bare / t_plain,
        "ratio_2workers_vs_1proc": t_ours / t_workers,
        "ratio_2workers_file_system_vs_1proc": t_ours / t_workers_fs,
        "image_size": image_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-bench"))
    parser.add_argument("--big-gb", type=float, default=1.0, help="size of the replicated dump")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--images", type=int, default=5000, help="images per image-throughput run")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-load", type=float, default=1.3, help="wait for a 1-minute load average below this")
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for it at most, per part")
    parser.add_argument("--parts", default="a,b", help="a: index; b: images (b and c)")
    parser.add_argument("--cold", action="store_true", help="(a): drop the file from the page cache before each run")
    parser.add_argument("--image-sets", default="sample,fashion", help="dumps for (b, c): sample, fashion")
    parser.add_argument(
        "--processes", type=int, default=0, help="(b) also in this many fresh processes (ratio per process)"
    )
    args = parser.parse_args()
    sample = args.data / "cdiscount" / "train_example.bson"
    fashion = args.data / "fashion" / "train.bson"
    image_sets = {"sample": sample, "fashion": fashion}
    if args.parts == "b-one":  # one of --processes' runs: one line of JSON
        (name,) = args.image_sets.split(",")
        r = b_one_process(image_sets[name], args.work, args.images, args.image_size, args.batch, args.repeat)
        print(json.dumps(r))
        return

    big = make_big_dump([fashion, sample], args.work / "big.bson", int(args.big_gb * 1e9))
    big_cdiscount = make_big_dump([sample], args.work / "big_cdiscount.bson", int(args.big_gb * 1e9))
    print(f"cpus {os.cpu_count()}  load average {os.getloadavg()[0]:.2f} (other jobs share this machine)")
    parts = args.parts.split(",")
    if "a" in parts:
        load = wait_for_idle(args.max_load, args.wait)
        how = "cold page cache (dropped before each run), median" if args.cold else "warm page cache, best"
        print(f"\n(a) index build vs sequential read, in turn, {how} of {args.repeat}; load {load:.2f}")
        header = ("file", "MB", "products", "read MB/s", "index MB/s", "ratio", "load")
        print("{:24s} {:>8s} {:>9s} {:>10s} {:>11s} {:>6s} {:>5s}".format(*header))
        for path in (sample, fashion, big, big_cdiscount):
            r = bench_index(path, args.repeat, args.cold)
            print(
                f"{r['file']:24s} {r['MB']:8.1f} {r['products']:9d} {r['read_MBps']:10.0f} "
                f"{r['index_MBps']:11.0f} {r['ratio']:6.2f} {os.getloadavg()[0]:5.2f}"
            )
    if "b" in parts:
        print(f"\n(b, c) images/s, {args.images} random images, tf_efficientnet_lite0 at {args.image_size}px")
        for path in (image_sets[name] for name in args.image_sets.split(",")):
            wait_for_idle(args.max_load, args.wait)
            r = bench_images(path, args.work, args.images, args.image_size, args.batch, args.repeat)
            print(
                f"{r['file']:20s} load {r['load']:.2f}  bare decode {r['bare_decode_ips']:5.0f}  "
                f"dataset 1 proc {r['dataset_1proc_ips']:5.0f} (x{r['ratio_1proc_vs_bare']:.2f})  "
                f"bare simplejpeg {r['bare_simplejpeg_ips']:5.0f} "
                f"(dataset x{r['ratio_1proc_vs_bare_simplejpeg']:.2f})  "
                f"+ torch normalise {r['dataset_float_ips']:5.0f} (x{r['ratio_float_vs_bare']:.2f})  "
                f"Pillow resize/img {r['pillow_resize_ips']:5.0f} (x{r['ratio_pillow_resize_vs_bare']:.2f})  "
                f"timm float {r['timm_float_ips']:5.0f} (x{r['ratio_timm_vs_bare']:.2f})  "
                f"no resize {r['dataset_1proc_no_resize_ips']:5.0f} (x{r['ratio_no_resize_vs_bare']:.2f})  "
                f"2 workers {r['dataloader_2workers_ips']:5.0f} (x{r['ratio_2workers_vs_1proc']:.2f} of 1 proc; "
                f"{r['sharing_strategy']})  "
                f"2 workers {r['dataloader_2workers_file_system_ips']:5.0f} "
                f"(x{r['ratio_2workers_file_system_vs_1proc']:.2f}; file_system)"
            )
        if args.processes:
            print(f"\n(b) in {args.processes} fresh processes, bare Pillow decode and dataset in turn in each")
            for name in args.image_sets.split(","):
                wait_for_idle(args.max_load, args.wait)
                runs = b_in_fresh_processes(args, name, args.processes)
                ratios = sorted(r["ratio"] for r in runs)
                print(
                    f"{image_sets[name].name:20s} load {os.getloadavg()[0]:.2f}  ratio median "
                    f"{statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})  bare decode "
                    + ", ".join(f"{r['bare_ips']:.0f}" for r in runs)
                    + "  dataset "
                    + ", ".join(f"{r['dataset_ips']:.0f}" for r in runs)
                )


if __name__ == "__main__":
    main()
