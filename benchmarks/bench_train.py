"""Training images/s of hierclass fine-tuning a CNN from images against timm's own ``train.py``.

Both train the same timm model (random init) from the same images, at the same image size, batch
size, DataLoader workers, optimiser (AdamW, lr 1e-3, weight decay 1e-4, cosine), label smoothing
0.1, augmentation (timm's random resized crop, flip, colour jitter) and AMP setting, one after the
other in their own processes:

* hierclass: ``hierclass train-flat --train SUBSET.bson ...``; its rate is the training images of
  an epoch over that epoch's ``train_seconds`` (log.jsonl: the training loop, DataLoader included;
  the holdout scoring and the checkpoint after it are not);
* timm: ``train.py`` (from a checkout of pytorch-image-models, run as it is) on an ImageFolder export
  of the same images; its rate is the average of its own ``samples/s`` over the epoch (update time,
  data wait included; validation and checkpoints are not).

The last epoch is compared (the first pays for warm-up). The subset is the first ``--products``
products of the dump; the ImageFolder export holds the same JPEG bytes, one folder per category.

    python benchmarks/bench_train.py --timm-train /path/to/pytorch-image-models/train.py
    python benchmarks/bench_train.py --timm-train ... --device cuda --model efficientnet_b0 \\
        --image-size 180 --batch-size 128 --amp bf16 --products 20000

Goal: hierclass >= 1.0x timm. Run it on an idle machine; under load, rates move several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO.parent / "shared" / "data" / "fashion"
TIMM_RATE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+).*?\(([\d.]+)s,\s*([\d.]+)/s\)")


def export(source_path: Path, n_products: int, work: Path) -> tuple[Path, Path, int]:
    """The first ``n_products`` products as a dump (for hierclass) and as an ImageFolder (for timm)."""
    from hierclass.data import open_source, products_of, write_dump

    source = open_source(source_path, progress=False)
    rows = range(min(n_products, len(source)))
    dump, folder = work / "subset.bson", work / "folder"
    n_images = 0
    if not dump.exists():
        products = list(products_of(source, rows))
        write_dump(dump, products)
        for product_id, category_id, jpegs in products:
            for k, data in enumerate(jpegs):
                target = folder / "train" / str(category_id) / f"{product_id}-{k}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        (folder / "validation").symlink_to(folder / "train", target_is_directory=True)
    n_images = sum(1 for _ in (folder / "train").rglob("*.jpg"))
    return dump, folder, n_images


def run_hierclass(args: argparse.Namespace, dump: Path, work: Path, env: dict[str, str]) -> dict[str, float]:
    run = work / f"hierclass-{time.strftime('%H%M%S')}"
    command = [sys.executable, "-m", "hierclass", "train-flat", "--train", str(dump), "--taxonomy", str(args.taxonomy)]
    command += ["--run-dir", str(run), "--backbone", args.model, "--pretrained", "none"]
    command += ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
    command += ["--epochs", str(args.epochs), "--patience", "0", "--workers", str(args.workers), "--no-progress"]
    command += ["--lr", "1e-3", "--weight-decay", "1e-4", "--warmup", "0", "--label-smoothing", "0.1"]
    command += ["--device", args.device, "--amp", args.amp]
    command += ["--channels-last"] if args.channels_last else ["--no-channels-last"]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run / "flat" / "log.jsonl").read_text().splitlines()]
    n_train = json.loads((run / "flat" / "meta.json").read_text())["metrics"]["n_train"]
    rates = [n_train / r["train_seconds"] for r in records]
    return {"img_s_last_epoch": rates[-1], "img_s_per_epoch": rates, "n_train": n_train, "wall_s": wall}


def run_timm(args: argparse.Namespace, folder: Path, work: Path, env: dict[str, str]) -> dict[str, float]:
    out = work / f"timm-{time.strftime('%H%M%S')}"
    command = [sys.executable, str(args.timm_train), "--data-dir", str(folder), "--model", args.model]
    command += ["--num-classes", str(args.num_classes), "--img-size", str(args.image_size)]
    command += ["-b", str(args.batch_size), "--epochs", str(args.epochs), "-j", str(args.workers)]
    command += ["--opt", "adamw", "--lr", "1e-3", "--weight-decay", "1e-4", "--sched", "cosine"]
    command += ["--warmup-epochs", "0", "--smoothing", "0.1", "--log-interval", "1", "--output", str(out)]
    command += ["--checkpoint-hist", "1", "--device", args.device, "--seed", "0"]
    if args.device == "cpu":
        command += ["--no-prefetcher"]
    if args.amp != "off":
        command += ["--amp", "--amp-dtype", "bfloat16" if args.amp == "bf16" else "float16"]
    if args.channels_last:
        command += ["--channels-last"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=str(work))
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"timm train.py failed:\n{done.stderr[-3000:]}")
    last: dict[int, float] = {}
    for match in TIMM_RATE.finditer(done.stdout + done.stderr):
        last[int(match.group(1))] = float(match.group(5))  # the epoch's running average, at its last line
    rates = [last[e] for e in sorted(last)]
    return {"img_s_last_epoch": rates[-1], "img_s_per_epoch": rates, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (pytorch-image-models).")
    parser.add_argument("--data", type=Path, default=FASHION / "train.bson")
    parser.add_argument("--taxonomy", type=Path, default=FASHION / "category_names.csv")
    parser.add_argument("--products", type=int, default=640)
    parser.add_argument("--model", default="mobilenetv3_small_050")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: unset).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="Alternate the two this many times.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-bench-train"))
    args = parser.parse_args()

    from hierclass.taxonomy import Taxonomy

    args.num_classes = Taxonomy.from_csv(args.taxonomy).n_leaves  # timm's head as wide as hierclass's flat head
    args.work.mkdir(parents=True, exist_ok=True)
    dump, folder, n_images = export(args.data, args.products, args.work)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    setting = f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.workers} workers"
    print(f"{n_images} images of {args.products} products, {setting}, {args.device}, amp {args.amp}")
    results = []
    for _ in range(args.repeats):
        ours, theirs = run_hierclass(args, dump, args.work, env), run_timm(args, folder, args.work, env)
        ratio = ours["img_s_last_epoch"] / theirs["img_s_last_epoch"]
        results.append({"hierclass": ours, "timm": theirs, "ratio": ratio})
        print(
            f"hierclass {ours['img_s_last_epoch']:.1f} img/s (epochs {[round(r, 1) for r in ours['img_s_per_epoch']]}, "
            f"wall {ours['wall_s']:.0f} s)  timm {theirs['img_s_last_epoch']:.1f} img/s (epochs "
            f"{[round(r, 1) for r in theirs['img_s_per_epoch']]}, wall {theirs['wall_s']:.0f} s)  ratio {ratio:.2f}x"
            f"  load {os.getloadavg()[0]:.1f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
