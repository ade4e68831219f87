"""Cdiscount-scale benchmark: training time, inference throughput and memory of flat vs hierarchical heads.

The real images are out of reach; the real label space (5,270 leaves) and imbalance (per-leaf
image counts of the 12.4M training images) are not. This script simulates features with that
label distribution (:mod:`simulate`), writes them to float16 feature stores under ``--out``,
and runs every phase in its own spawned process so each phase's peak memory is its own:

* train the flat head, the router and the experts (``train_head``, same batch size and config);
* predict a held-out simulated split with flat, hierarchical soft and hierarchical top-k.

Every phase runs with ``--threads`` compute threads (default 1: ``torch.set_num_threads`` and
the OpenMP/BLAS thread variables in the children's environment), so flat and hierarchical are
timed under the same conditions and the benchmark leaves the other cores to other jobs; the
1-minute load average is recorded just before and just after each phase.

Per phase it records seconds per epoch (training, without the validation pass), images/s,
peak RSS (``VmHWM``: anonymous memory plus the mapped feature pages), peak anonymous RSS
(``RssAnon``, sampled every 50 ms) and peak file-backed RSS (``RssFile``: memmap pages, i.e.
page cache that the kernel can drop), and leaf top-1 on the held-out split. Training is
measured at every ``--n``, inference at the largest. Results go to ``results.json`` and a
Markdown table on stdout, with the linear extrapolation to the real 12,371,293 images.

    .venv/bin/python benchmarks/scale.py --n 1000000             # develop with --n 50000
    .venv/bin/python benchmarks/scale.py --n 200000 --no-infer  # training memory at a smaller N
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulate import Structure, leaf_image_counts, write_simulated_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CDISCOUNT = REPO.parent / "shared" / "data" / "cdiscount"
REAL_IMAGES = 12_371_293


# ---------------------------------------------------------------------------- memory
def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


class MemorySampler:
    """Peak RssAnon and RssFile of this process, sampled by a thread (the kernel keeps only VmHWM)."""

    def __init__(self, every: float = 0.05) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            now = _status_kib()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now.get(key, 0))
            self._stop.wait(every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, start: dict[str, int]) -> dict[str, float]:
        now = _status_kib()
        mib = 1 / 1024
        return {
            "peak_rss_mib": round(now["VmHWM"] * mib, 1),
            "peak_anon_mib": round(max(self.peak["RssAnon"], now.get("RssAnon", 0)) * mib, 1),
            "peak_file_mib": round(max(self.peak["RssFile"], now.get("RssFile", 0)) * mib, 1),
            "start_rss_mib": round(start["VmRSS"] * mib, 1),
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * mib, 1),
        }


# ---------------------------------------------------------------------------- phases (run in children)
def _taxonomy():
    from hierclass.taxonomy import Taxonomy

    return Taxonomy.from_csv(CDISCOUNT / "category_names.csv")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def phase_train(
    kind: str, train_dir: str, val_dir: str, out_dir: str, config: dict[str, Any], threads: int = 1
) -> dict[str, Any]:
    """Train one head; seconds per epoch without validation, images/s, memory.

    ``val_acc`` is the validation top-1 of the head's own task: level-1 branch (router), leaf
    (flat), leaf within the true branch (experts).
    """
    import torch  # noqa: F401  (imported before the baseline so its memory is in start_rss)

    threads = _threads(threads)

    from hierclass.engine import TrainConfig, train_head
    from hierclass.featurestore import FeatureStore

    tax = _taxonomy()
    start = _status_kib()
    with MemorySampler() as mem:
        train, val = FeatureStore.open(train_dir), FeatureStore.open(val_dir)
        cpu0 = _cpu_seconds()
        final = train_head(kind, train, val, tax, TrainConfig(**config), out_dir)
        cpu = _cpu_seconds() - cpu0
    logs = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    per_epoch = float(np.mean([r["train_seconds"] for r in logs]))
    return {
        "phase": f"train {kind}",
        "seconds_per_epoch": round(per_epoch, 1),
        "images_per_s": round(final["n_train"] / per_epoch),
        "n_train": final["n_train"],
        "val_acc": round(final["val_acc"], 4),
        "epochs": final["epochs_run"],
        "cpu_s_per_epoch": round(cpu / final["epochs_run"], 1),  # all threads, incl. the validation pass
        "threads": threads,
        **mem.report(start),
    }


def phase_infer(name: str, run_dir: str, test_dir: str, threads: int = 1) -> dict[str, Any]:
    """Predict the test store (``predict_store``, 8,192-image chunks); images/s of ``predict_proba``."""
    import torch  # noqa: F401

    threads = _threads(threads)

    from hierclass.featurestore import FeatureStore
    from hierclass.inference import FlatClassifier, HierarchicalClassifier, predict_store

    tax = _taxonomy()
    start = _status_kib()
    with MemorySampler() as mem:
        if name == "flat":
            clf = FlatClassifier.from_run(run_dir, tax)
        else:
            clf = HierarchicalClassifier.from_run(run_dir, tax, combine=name.split()[-1])
        test = FeatureStore.open(test_dir)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        images, _ = predict_store(clf, test)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {
        "phase": f"infer {name}",
        "images_per_s": round(len(images) / images.seconds),
        "wall_images_per_s": round(len(images) / wall),
        "cpu_images_per_s": round(len(images) / cpu),  # end to end, per CPU second
        "leaf_top1": round(float((images.pred == images.leaf).mean()), 4),
        "level1_top1": round(float((tax.leaf_level1[images.pred] == tax.leaf_level1[images.leaf]).mean()), 4),
        "threads": threads,
        **mem.report(start),
    }


def phase_write(out: str, n: int, seed: int, structure: dict[str, float]) -> dict[str, Any]:
    """Write one simulated store (skipped when a complete one with the same settings exists)."""
    from hierclass.featurestore import FeatureStore, FeatureStoreError

    tax = _taxonomy()
    try:
        store = FeatureStore.open(out)
        if store.n_images == n and store.meta["backbone"]["structure"] == structure:
            return {"phase": f"write {Path(out).name}", "seconds": 0.0, "reused": True}
        raise SystemExit(f"{out}: a store with other settings exists; remove it or choose another --out")
    except FeatureStoreError:
        pass
    weights = leaf_image_counts(tax, CDISCOUNT / "category_count_level3.csv")
    start = _status_kib()
    t0 = time.perf_counter()
    with MemorySampler() as mem:
        write_simulated_store(out, tax, weights, n, seed, structure=Structure(**structure), progress=False)
    seconds = time.perf_counter() - t0
    return {
        "phase": f"write {Path(out).name}",
        "seconds": round(seconds, 1),
        "images_per_s": round(n / seconds),
        **mem.report(start),
    }


def in_child(fn, *args) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh spawned process, so its peak memory is its own; load average around it."""
    before = _loadavg()
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(fn, *args).result()
    result = {**result, "load_before": before, "load_after": _loadavg()}
    print(json.dumps(result), flush=True)
    return result


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="training images (several: memory vs N)")
    ap.add_argument("--test", type=int, default=50_000, help="held-out images for inference and leaf top-1")
    ap.add_argument("--val", type=int, default=10_000, help="validation images (the per-epoch pass of train_head)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="compute threads of every phase (torch, OpenMP, BLAS)")
    ap.add_argument(
        "--structure",
        type=float,
        nargs=4,
        metavar=("LEVEL1", "LEVEL2", "LEAF", "NOISE"),
        help="per-component scales of the simulated features (default: simulate.Structure())",
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/hierclass-scale"))
    ap.add_argument(
        "--heads",
        nargs="*",
        default=["flat", "router", "experts"],
        choices=["flat", "router", "experts"],
        help="heads to train (none: inference only, from the run directory's existing heads)",
    )
    ap.add_argument("--no-infer", action="store_true", help="skip the inference phases")
    ap.add_argument(
        "--infer",
        nargs="+",
        default=["flat", "soft", "topk"],
        choices=["flat", "soft", "topk"],
        help="inference phases: flat, hierarchical soft, hierarchical top-k",
    )
    ap.add_argument("--results", default="results.json", help="file name of the results under --out")
    args = ap.parse_args(argv)
    structure = asdict(Structure(*args.structure) if args.structure else Structure())
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # inherited by the spawned phases, before they import torch
    config = {"solver": "adamw", "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "patience": 0}
    config["progress"] = False
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "structure": structure}
    results["train_config"] = config
    results["load_before"] = _loadavg()
    results["cpus"] = os.cpu_count()
    results["threads"] = args.threads
    rows: list[dict[str, Any]] = []

    def save() -> None:
        results["rows"] = rows
        results["load_after"] = _loadavg()
        (args.out / args.results).write_text(json.dumps(results, indent=2))

    test_dir, val_dir = str(args.out / "test"), str(args.out / "val")
    rows.append(in_child(phase_write, test_dir, args.test, 1, structure))
    rows.append(in_child(phase_write, val_dir, args.val, 2, structure))
    for n in sorted(args.n):
        train_dir, run_dir = str(args.out / f"train-{n}"), args.out / f"run-{n}"
        rows.append({"n": n, **in_child(phase_write, train_dir, n, 3, structure)})
        for kind in args.heads:
            if (run_dir / kind / "log.jsonl").exists():
                (run_dir / kind / "log.jsonl").unlink()  # a rerun logs afresh
            rows.append(
                {"n": n, **in_child(phase_train, kind, train_dir, val_dir, str(run_dir / kind), config, args.threads)}
            )
            save()
    n = max(args.n)
    for name in () if args.no_infer else [n if n == "flat" else f"hier {n}" for n in args.infer]:
        rows.append({"n": n, **in_child(phase_infer, name, str(args.out / f"run-{n}"), test_dir, args.threads)})
        save()
    print(markdown(rows, n))


def markdown(rows: list[dict[str, Any]], n_max: int) -> str:
    """The results table and the extrapolation of the training time to the real 12.4M images."""
    lines = [
        "| N | phase | s/epoch | images/s | peak RSS MiB | peak anon MiB | peak file MiB | val top-1 | "
        "test leaf top-1 | test level-1 top-1 | load before/after |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "peak_rss_mib" not in r:
            continue
        lines.append(
            f"| {r.get('n', '')} | {r['phase']} | {r.get('seconds_per_epoch', '')} | {r['images_per_s']:,} | "
            f"{r['peak_rss_mib']:,} | {r['peak_anon_mib']:,} | {r['peak_file_mib']:,} | "
            f"{r.get('val_acc', '')} | {r.get('leaf_top1', '')} | {r.get('level1_top1', '')} | "
            f"{r['load_before'][0]} / {r['load_after'][0]} |"
        )
    train = {r["phase"]: r for r in rows if r.get("n") == n_max and "seconds_per_epoch" in r}
    if {"train flat", "train router", "train experts"} <= set(train):
        lines.append("")
        scale = REAL_IMAGES / n_max
        flat = train["train flat"]["seconds_per_epoch"] * scale
        hier = (train["train router"]["seconds_per_epoch"] + train["train experts"]["seconds_per_epoch"]) * scale
        lines.append(
            f"Linear extrapolation to {REAL_IMAGES:,} images (x{scale:.2f}): flat {flat / 3600:.2f} h/epoch, "
            f"router + experts {hier / 3600:.2f} h/epoch."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
