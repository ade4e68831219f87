"""How fast ``hierclass serve`` answers, against ``hierclass predict`` on the same images in the same run.

    python benchmarks/bench_serve.py [--work /tmp/hierclass-bench-serve] [--image-size 128]

1. A run: EfficientNet-Lite0 (the offline ImageNet weights) features of an evenly spread share of
   Fashion's train.bson at ``--image-size``, and its router, experts and flat heads (built once in
   ``--work``, reused after).
2. The images: the 110 real 180x180 JPEGs of Cdiscount's sample dump.
3. Offline: ``hierclass predict --run RUN --data DUMP`` on a dump of those images (each ``--repeat``
   times); its img/s is the feature extraction loop's (decode + resize + backbone, batches of 64), as
   the features cache records it. Its CSV is the reference answer of each image.
4. Online: ``hierclass serve`` in a subprocess; latency (p50/p95) of one 180x180 JPEG per request from
   one client, then throughput (img/s) with 8 concurrent clients (one image per request).
5. A bounded load run: ``--load`` requests from 8 clients, 10% of them bad (not an image, truncated,
   empty, wrong field, 50 images, over the size limit): every bad one must get a 4xx, none a 5xx, and
   every good one predict's answer (top-5 category_ids, probabilities within 1e-5). The server's
   resident memory is read before and after.

Prints a markdown table and writes the figures as JSON to ``--out`` (default: WORK/bench_serve.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))
from serve_browser import served  # noqa: E402  (the browser test's way of starting the server)

CLIENTS = 8


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from hierclass.cli import main; main()", *args]


def build_run(work: Path, image_size: int, share: float) -> Path:
    """A Lite0 run on an evenly spread ``share`` of Fashion's train.bson (made once)."""
    from hierclass.data import open_source, products_of, write_dump

    run = work / "run"
    if (run / "flat").is_dir() and (run / "experts").is_dir():
        return run
    train = SHARED / "fashion" / "train.bson"
    if not train.is_file():
        raise SystemExit(f"error: {train} not found; the benchmark trains its run on the Fashion catalogue")
    source = open_source(train, progress=False)
    step = max(1, round(1 / share))
    subset = work / "fashion-train-subset.bson"
    write_dump(subset, products_of(source, range(0, len(source), step)))
    tax = SHARED / "fashion" / "category_names.csv"
    feats = work / "features"
    subprocess.run(cli("extract-features", "--data", str(subset), "--taxonomy", str(tax), "--out", str(feats),
                       "--image-size", str(image_size), "--no-progress"), check=True)  # fmt: skip
    for kind in ("router", "experts", "flat"):
        subprocess.run(cli(f"train-{kind}", "--train", str(feats), "--run", str(run), "--no-progress"), check=True)
    return run


def sample_images(work: Path, repeat: int) -> tuple[list[bytes], Path]:
    """The 110 JPEGs of Cdiscount's sample, and a dump of them repeated ``repeat`` times (ids 0, 1, ...)."""
    from hierclass.data import open_source, write_dump

    sample = SHARED / "cdiscount" / "train_example.bson"
    if not sample.is_file():
        raise SystemExit(f"error: {sample} not found; the benchmark's requests are its 180x180 photos")
    source = open_source(sample, progress=False, cache_dir=work / "index")
    images = [data for p in range(len(source)) for data in source.read_images(p)]
    dump = work / f"images-x{repeat}.bson"
    write_dump(dump, ((i, None, [data]) for i, data in enumerate(images * repeat)))
    return images, dump


def offline(run: Path, dump: Path, work: Path) -> tuple[float, dict[int, list[tuple[int, float]]]]:
    """``hierclass predict``'s img/s (its extraction loop) and its top-5 answer for each image id."""
    cache = work / f"predict-cache-{time.time_ns()}"
    out = work / "predict.csv"
    cmd = cli("predict", "--run", str(run), "--data", str(dump), "--out", str(out), "--topk", "5",
              "--features-cache", str(cache), "--no-progress")  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rate = json.loads((cache / "meta.json").read_text())["last_run"]["images_per_s"]
    answers = {}
    with out.open() as f:
        for row in csv.DictReader(f):
            answers[int(row["_id"])] = [
                (int(row[f"top{i}_category_id"]), float(row[f"top{i}_prob"])) for i in range(1, 6)
            ]
    return float(rate), answers


def same(body: dict, expected: list[tuple[int, float]]) -> bool:
    got = [(p["category_id"], p["probability"]) for p in body["predictions"]]
    return [c for c, _ in got] == [c for c, _ in expected] and all(
        abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(got, expected, strict=True)
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bad_request(i: int, good: bytes) -> dict:
    kinds = [
        {"files": [("image", ("notes.jpg", b"this is not a photo", "image/jpeg"))]},
        {"files": [("image", ("cut.jpg", good[: len(good) // 2], "image/jpeg"))]},
        {"files": [("image", ("empty.jpg", b"", "image/jpeg"))]},
        {"files": [("file", ("a.jpg", good, "image/jpeg"))]},
        {"files": [("image", (f"{k}.jpg", good, "image/jpeg")) for k in range(50)]},
        {"files": [("image", ("big.jpg", good + b"\0" * (3 * 1024 * 1024), "image/jpeg"))]},
    ]
    return kinds[i % len(kinds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-bench-serve"))
    parser.add_argument("--image-size", type=int, default=128, help="the run's input size (px)")
    parser.add_argument("--share", type=float, default=0.1, help="share of Fashion's train.bson the run trains on")
    parser.add_argument("--repeat", type=int, default=4, help="copies of the 110 images in predict's dump")
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--throughput-requests", type=int, default=800)
    parser.add_argument("--load", type=int, default=2000, help="requests of the load run (10%% bad)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()

    run = build_run(args.work, args.image_size, args.share)
    images, dump = sample_images(args.work, args.repeat)
    rate_offline, reference = offline(run, dump, args.work)
    print(f"offline: hierclass predict {rate_offline:.1f} img/s on {len(images) * args.repeat} images")

    results: dict = {"offline_img_s": rate_offline}
    with served(run, "--max-upload-mb", "2") as server:
        url, pid = server.url, server.pid
        rss_started = rss_mib(pid)
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(10):  # warm-up
                client.post("/predict", files={"image": ("w.jpg", images[i], "image/jpeg")})
            lat = []
            for i in range(args.latency_requests):
                t0 = time.perf_counter()
                r = client.post("/predict", files={"image": (f"{i}.jpg", images[i % len(images)], "image/jpeg")})
                lat.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
        q = statistics.quantiles(lat, n=20)
        results.update(p50_ms=statistics.median(lat), p95_ms=q[18], server_ms_last=r.json()["ms"])
        p50, p95 = results["p50_ms"], results["p95_ms"]
        print(f"latency: p50 {p50:.1f} ms, p95 {p95:.1f} ms ({args.latency_requests} requests)")

        def worker(indices: list[int]) -> list[tuple[int, int, dict | None, bool]]:
            out = []
            with httpx.Client(base_url=url, timeout=120) as c:
                for j in indices:
                    if j < 0:  # a bad request
                        r = c.post("/predict", **bad_request(-j, images[0]))
                        out.append((j, r.status_code, None, True))
                    else:
                        r = c.post("/predict", files={"image": (f"{j}.jpg", images[j % len(images)], "image/jpeg")})
                        out.append((j, r.status_code, r.json() if r.status_code == 200 else None, False))
            return out

        def spread(jobs: list[int]) -> list[list[int]]:
            return [jobs[k::CLIENTS] for k in range(CLIENTS)]

        before = httpx.get(url + "health").json()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            done = [x for part in pool.map(worker, spread(list(range(args.throughput_requests)))) for x in part]
        wall = time.perf_counter() - t0
        after = httpx.get(url + "health").json()
        assert all(s == 200 for _, s, _, _ in done)
        results["concurrent_img_s"] = args.throughput_requests / wall
        results["requests_per_batch"] = (after["requests"] - before["requests"]) / max(
            1, after["batches"] - before["batches"]
        )
        print(f"throughput: {results['concurrent_img_s']:.1f} img/s with {CLIENTS} clients "
              f"({results['requests_per_batch']:.2f} requests per backbone batch)")  # fmt: skip

        jobs = [-(k + 1) if k % 10 == 9 else k for k in range(args.load)]
        rss_start = rss_mib(pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            done = [x for part in pool.map(worker, spread(jobs)) for x in part]
        load_wall = time.perf_counter() - t0
        server_errors = sum(s >= 500 for _, s, _, _ in done)
        bad_not_4xx = sum(bad and not 400 <= s < 500 for _, s, _, bad in done)
        good = [(j, s, body) for j, s, body, bad in done if not bad]
        wrong = sum(s != 200 or not same(body, reference[j % len(images)]) for j, s, body in good)
        rss_end = rss_mib(pid)
        results.update(
            load_requests=len(done), load_bad=sum(bad for *_, bad in done), load_5xx=server_errors,
            load_bad_not_4xx=bad_not_4xx, load_wrong=wrong, load_seconds=load_wall,
            rss_mib_started=rss_started, rss_mib_start=rss_start, rss_mib_end=rss_end,
        )  # fmt: skip
        print(f"load: {len(done)} requests ({results['load_bad']} bad) in {load_wall:.1f} s: {server_errors} 5xx, "
              f"{bad_not_4xx} bad ones not 4xx, {wrong} wrong answers; "
              f"server RSS {rss_start:.0f} -> {rss_end:.0f} MiB")  # fmt: skip

    results["ratio_concurrent_to_offline"] = results["concurrent_img_s"] / rate_offline
    results["meta"] = {
        "started": started, "image_size": args.image_size, "share": args.share, "python": platform.python_version(),
        "cores": len(os.sched_getaffinity(0)), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "run": str(run),
    }  # fmt: skip
    out = args.out or args.work / "bench_serve.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("| figure | value | goal |")
    print("| --- | --- | --- |")
    print(f"| latency p50, one 180x180 JPEG over HTTP | {results['p50_ms']:.1f} ms | <= 30 ms |")
    print(f"| latency p95 | {results['p95_ms']:.1f} ms | |")
    print(f"| throughput, {CLIENTS} concurrent clients | {results['concurrent_img_s']:.1f} img/s | |")
    print(f"| `hierclass predict` offline, same images, same run | {rate_offline:.1f} img/s | |")
    print(f"| concurrent / offline | {results['ratio_concurrent_to_offline']:.2f}x | >= 0.8x |")
    print(f"| load run: 5xx / bad not 4xx / wrong answers | {server_errors} / {bad_not_4xx} / {wrong} "
          f"of {len(done)} ({results['load_bad']} bad) | 0 / 0 / 0 |")  # fmt: skip
    print(f"| server memory (RSS) at start / before / after the load run | {rss_started:.0f} / {rss_start:.0f} / "
          f"{rss_end:.0f} MiB | flat |")  # fmt: skip
    print(f"\nload average before {load_before}, after {os.getloadavg()}; figures in {out}")


if __name__ == "__main__":
    main()
