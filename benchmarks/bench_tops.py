"""Speed of CNN tops on cached trunk maps against heads on pooled features, on this machine.

Measures, for EfficientNet-Lite0 at a given image size (default 128 px):

* training images/s of a flat top at cut 1 and cut 2 (AdamW steps through the engine's own
  training epoch) against a linear flat head on pooled vectors;
* the experts' epoch time against the flat top's (the goal: at most 1.1x; the median of
  ``--rounds`` epochs of each, timed in turn), with the real
  Cdiscount or Fashion taxonomy's branch sizes and a long-tailed label draw;
* extraction images/s of trunk maps against pooled features on the same dump, in the same run
  (the goal: at least 0.95x);
* bytes per stored image and what that makes for Cdiscount's 12.4M images.

    .venv/bin/python benchmarks/bench_tops.py                   # synthetic maps, the Fashion taxonomy
    .venv/bin/python benchmarks/bench_tops.py --images 4096 --image-size 128

Run it on an idle machine: training throughput of a top falls several-fold under load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO.parent / "shared" / "data" / "fashion"
CDISCOUNT_IMAGES = 12_371_293


def _store(root: Path, dim: int, leaf: np.ndarray, meta: dict, rng: np.random.Generator):  # noqa: ANN202
    from hierclass.featurestore import OK, FeatureStore

    n = len(leaf)
    store = FeatureStore.create(root, dim=dim, product_id=np.arange(n), image_number=np.zeros(n), leaf=leaf, meta=meta)
    for start in range(0, n, 4096):
        rows = np.arange(start, min(n, start + 4096))
        store.write(rows, {"orig": rng.random((len(rows), dim), dtype=np.float32) * 2}, OK)
    store.mark_complete()
    return store


def train_rate(kind: str, store, taxonomy, batch_size: int, seconds_budget: float = 20.0) -> dict:  # noqa: ANN001
    """Images/s of one training epoch of ``kind`` on ``store`` (after one warm-up step batch)."""
    import torch

    from hierclass.config import TrainConfig
    from hierclass.engine import Task, _adamw, _split, train_one_epoch

    config = TrainConfig(batch_size=batch_size, progress=False, standardize=False)
    task = Task(kind, taxonomy)
    torch.manual_seed(0)
    model = task.build_model(store.dim, config, store.meta)
    data = _split(store, task)
    optimizer = _adamw(model, config)
    rng = np.random.default_rng(0)
    warm = type(data)(data.store, data.rows[: batch_size * 2], data.target[: batch_size * 2])
    train_one_epoch(model, task, warm, optimizer, config, rng, 0, 100, None, None)
    t0 = time.perf_counter()
    train_one_epoch(model, task, data, optimizer, config, rng, 0, 100, None, None)
    seconds = time.perf_counter() - t0
    return {"images": len(data), "seconds": round(seconds, 2), "images_per_s": round(len(data) / seconds, 1)}


def extraction_rate(dump: Path, taxonomy: Path, image_size: int, top_stages: int, out: Path) -> float:
    from hierclass.features import extract_features

    store = extract_features(
        dump, taxonomy, out=out, image_size=image_size, top_stages=top_stages, progress=False, batch_size=64
    )
    return float(store.meta["last_run"]["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="training images per measured epoch")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--taxonomy", type=Path, default=FASHION / "category_names.csv")
    parser.add_argument("--dump", type=Path, default=FASHION / "val.bson", help="dump for the extraction rates")
    parser.add_argument("--rounds", type=int, default=3, help="flat and experts epochs timed in turn, this many times")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not args.taxonomy.is_file():
        sys.exit(f"error: {args.taxonomy} not found; pass --taxonomy category_names.csv")

    from hierclass.models.backbone import create_backbone, data_config
    from hierclass.models.trunk import checked_split
    from hierclass.taxonomy import Taxonomy

    taxonomy = Taxonomy.from_csv(args.taxonomy)
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, taxonomy.n_leaves + 1) ** 0.7
    leaf = rng.choice(taxonomy.n_leaves, size=args.images, p=weights / weights.sum())
    backbone, pretrained = "tf_efficientnet_lite0", "efficientnet-lite0"
    model = create_backbone(backbone, pretrained)
    size = tuple(data_config(model, args.image_size)["input_size"])
    results: dict = {"image_size": args.image_size, "images": args.images, "taxonomy": str(args.taxonomy)}
    with tempfile.TemporaryDirectory(prefix="bench-tops-") as tmp:
        base = {"backbone": backbone, "pretrained": pretrained, "taxonomy_fingerprint": taxonomy.fingerprint}
        pooled = _store(Path(tmp) / "pooled", int(model.num_features), leaf, base, rng)
        results["pooled_flat_linear"] = train_rate("flat", pooled, taxonomy, 512)
        for cut in (1, 2):
            shape = checked_split(model, cut, size)[2]
            meta = {**base, "top_stages": cut, "map_shape": list(shape), "num_features": int(model.num_features)}
            store = _store(Path(tmp) / f"cut{cut}", int(np.prod(shape)), leaf, meta, rng)
            rounds = [  # in turn, so that both see the same machine
                (train_rate("flat", store, taxonomy, 128), train_rate("experts", store, taxonomy, 128))
                for _ in range(max(1, args.rounds))
            ]
            ratios = [e["seconds"] / f["seconds"] * f["images"] / e["images"] for f, e in rounds]
            flat, experts = rounds[int(np.argsort(ratios)[len(ratios) // 2])]  # the round of the median ratio
            results[f"cut{cut}"] = {
                "map_shape": list(shape),
                "bytes_per_image": int(np.prod(shape)) * 2,
                "cdiscount_gb": round(int(np.prod(shape)) * 2 * CDISCOUNT_IMAGES / 1e9, 1),
                "flat_top": flat,
                "experts": experts,
                "experts_over_flat_epoch": round(float(np.median(ratios)), 2),
                "experts_over_flat_each_round": [round(r, 2) for r in ratios],
            }
            print(json.dumps({f"cut{cut}": results[f"cut{cut}"]}), flush=True)
        if args.dump.is_file():
            dump = args.dump
            pooled_rate = extraction_rate(dump, args.taxonomy, args.image_size, 0, Path(tmp) / "x0")
            maps_rate = extraction_rate(dump, args.taxonomy, args.image_size, 1, Path(tmp) / "x1")
            pooled_again = extraction_rate(dump, args.taxonomy, args.image_size, 0, Path(tmp) / "x2")
            results["extraction"] = {
                "pooled_images_per_s": [pooled_rate, pooled_again],
                "cut1_images_per_s": maps_rate,
                "cut1_over_pooled": round(maps_rate / max(pooled_rate, pooled_again), 3),
            }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
