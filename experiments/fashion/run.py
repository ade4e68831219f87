"""Flat vs hierarchical on the real Fashion catalogue (../shared/data/fashion), frozen EfficientNet-Lite0.

Trains on train.bson and reports on val.bson. Everything tuned is chosen on a holdout of
train.bson's products (10%, seed 0): each head's L2 strength or early-stopping epoch, then the
temperatures and the fusion weight; val.bson is only scored. Features are extracted once
(128 px, offline ImageNet EfficientNet-Lite0, with --tta also the flipped view) and shared by
every head configuration below.

    .venv/bin/python experiments/fashion/run.py                      # every configuration
    .venv/bin/python experiments/fashion/run.py --configs linear     # one

Writes, next to this file: ``report.md`` / ``report.json`` / plots of the configuration named
FINAL, and ``results.md`` / ``results.json`` comparing every configuration run. Work files
(features, checkpoints) go to ``--work`` (default /tmp/hierclass-fashion), outside the repo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from hierclass.config import TrainConfig
from hierclass.pipeline import PipelineConfig, format_table, run_pipeline

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data" / "fashion"
FINAL = "mlp"

LINEAR = TrainConfig(epochs=30, patience=5, lr=1e-3, label_smoothing=0.1)
MLP = TrainConfig(epochs=30, patience=5, lr=1e-3, label_smoothing=0.1, hidden=1024, dropout=0.3)
OTHER = {"experts": {"expert_other": True}}  # experts also learn "other" from the other branches' samples

CONFIGS: dict[str, dict] = {
    # linear heads
    "linear": {"train": LINEAR},
    # one hidden layer per head (per branch for the experts), dropout against overfitting
    "mlp": {"train": MLP},
    # experts with an "other" class, so that a routing mistake can be recovered at inference
    "linear-other": {"train": LINEAR, "per_kind": OTHER},
    "mlp-other": {"train": MLP, "per_kind": OTHER},
    # MLP router and flat head, linear experts with "other" (MLP experts on every sample cost ~6x more)
    "mixed-other": {"train": MLP, "per_kind": {"experts": {"hidden": None, "dropout": 0.0, "expert_other": True}}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train.bson, val.bson, category_names.csv")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-fashion"))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tta", action="store_true", help="evaluate on the mean of the image and its mirror")
    args = parser.parse_args()
    for f in ("train.bson", "val.bson", "category_names.csv"):
        if not (args.data / f).is_file():
            raise SystemExit(f"error: {args.data / f} not found; pass --data FOLDER with the Fashion catalogue")

    results, wall = {}, {}
    for name in args.configs:
        t0 = time.perf_counter()
        config = PipelineConfig(image_size=128, hflip=args.tta, tta=args.tta, **CONFIGS[name])
        result = run_pipeline(
            args.data / "train.bson",
            args.data / "val.bson",
            args.data / "category_names.csv",
            args.work / (name + ("-tta" if args.tta else "")),
            config,
            report_meta={"data": "real Fashion catalogue (val.bson)", "experiment": name},
            features_dir=args.work / ("features-hflip" if args.tta else "features"),
        )
        wall[name] = time.perf_counter() - t0
        results[name] = result
        if name == FINAL and not args.tta:
            for item in result.report_md.parent.iterdir():
                shutil.copy(item, HERE / item.name)

    suffix = "-tta" if args.tta else ""
    results_json = HERE / f"results{suffix}.json"
    summary = json.loads(results_json.read_text()) if results_json.is_file() else {}  # runs accumulate
    keys = ("leaf_top1", "leaf_top5", "level1_acc", "level2_acc", "mistake_severity", "hierarchical_f1", "ece")
    for name, result in results.items():
        rep = result.report
        summary[name] = {"timings_s": result.timings, "wall_s": round(wall[name], 1), "models": {}}
        for model in rep["meta"]["models"]:
            m = rep[model]
            summary[name]["models"][model] = {k: m[k] for k in keys} | {
                "product_leaf_top1": m["product"]["leaf_top1"],
                "vs_flat": m.get("vs_flat"),
            }
        summary[name]["splits"] = rep["meta"]["splits"]
        summary[name]["warnings"] = rep["meta"]["warnings"]
    results_json.write_text(json.dumps(summary, indent=2) + "\n")

    header = ("config", "model", "leaf top-1", "top-5", "level-1", "level-2", "severity", "hF1", "ECE")
    rows = [(*header, "product top-1", "vs flat: points [95% CI] McNemar p")]
    for name, entry in summary.items():
        for model, m in entry["models"].items():
            cells = tuple(_num(m[k], 3 if k == "mistake_severity" else 4) for k in keys)
            rows.append((name, model, *cells, _num(m["product_leaf_top1"]), _versus(m.get("vs_flat"))))
    table = format_table(rows)
    timing_lines = [
        f"- {name}: " + ", ".join(f"{stage} {sec:.1f} s" for stage, sec in entry["timings_s"].items())
        for name, entry in summary.items()
    ]
    split_lines = [
        f"- {name}: heads' settings on {s['early_stopping']}; temperatures and fusion weight on "
        f"{s['calibration']}; scored on {s['scored']}"
        for name, entry in summary.items()
        if (s := entry.get("splits"))
    ]
    warnings = sorted({w for entry in summary.values() for w in entry.get("warnings", [])})
    (HERE / f"results{suffix}.md").write_text(
        "# Fashion: flat vs hierarchical (validation, image level unless noted)\n\n"
        + "".join(f"> **Warning:** {w}\n\n" for w in warnings)
        + "```\n"
        + table
        + "\n```\n\nWhich images chose what:\n\n"
        + "\n".join(split_lines or ["- not recorded"])
        + "\n\nStage times on a 2-core machine shared with other jobs (a reused stage shows ~0):\n\n"
        + "\n".join(timing_lines)
        + "\n"
    )
    print(table)
    for w in warnings:
        print(f"WARNING: {w}")


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _versus(v: dict | None) -> str:
    if not v or v.get("diff") is None:
        return "–"
    return (
        f"{100 * v['diff']:+.2f} [{100 * v['ci_low']:+.2f}, {100 * v['ci_high']:+.2f}] "
        f"p={v['mcnemar_p']:.2g} {v['verdict']}"
    )


if __name__ == "__main__":
    main()
