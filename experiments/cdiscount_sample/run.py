"""Smoke run on the real Cdiscount sample: the full 5,270-leaf label space, end to end.

``../shared/data/cdiscount/train_example.bson`` holds 82 products (110 images, 36 leaves). Its
products are split by leaf into train / validation (leaves with one product stay in train), the
pipeline runs with the real ``category_names.csv`` (router over 49 branches, experts over all
5,270 leaves, flat over 5,270 leaves), and the report is written next to this file.

ACCURACY HERE IS MEANINGLESS: a handful of validation products, heads trained on ~70 products
for 5,270 classes. The run proves that the full label space flows through every stage
(index, features, three heads, combined inference, report), nothing more.

    .venv/bin/python experiments/cdiscount_sample/run.py
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from hierclass.data import open_source, products_of, split_products, write_dump
from hierclass.engine import TrainConfig
from hierclass.pipeline import PipelineConfig, format_table, run_pipeline, summary_rows

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data" / "cdiscount"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train_example.bson, category_names.csv")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-cdiscount-sample"))
    args = parser.parse_args()
    dump, taxonomy = args.data / "train_example.bson", args.data / "category_names.csv"
    for f in (dump, taxonomy):
        if not f.is_file():
            raise SystemExit(f"error: {f} not found; pass --data FOLDER with the Cdiscount sample")

    source = open_source(dump, cache_dir=args.work / "index")
    train_rows, val_rows = split_products(source.category_ids, val_fraction=0.3, seed=0)
    args.work.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("val", val_rows)):
        write_dump(args.work / f"{name}.bson", products_of(source, rows))
    print(f"split: {len(train_rows)} train / {len(val_rows)} validation products")

    config = PipelineConfig(image_size=128, train=TrainConfig(epochs=5, patience=0))
    result = run_pipeline(
        args.work / "train.bson",
        args.work / "val.bson",
        taxonomy,
        args.work / "run",
        config,
        report_meta={"data": "real Cdiscount sample (82 products): accuracy is meaningless, this is a smoke run"},
    )
    for item in result.report_md.parent.iterdir():
        shutil.copy(item, HERE / item.name)
    print(format_table(summary_rows(result.report)))
    print("Accuracy on this sample is meaningless (a handful of products for 5,270 leaves): smoke run only.")


if __name__ == "__main__":
    main()
