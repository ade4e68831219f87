"""CNN tops against flat on the real Fashion catalogue: experts that own the backbone's last stage.

Every model here trains the last stage of the offline ImageNet EfficientNet-Lite0 (its conv
head, norm and pooling too) on cached trunk maps at 128 px (``--top-stages 1``: 192x4x4 maps,
with the flipped view for augmentation), with the same cut, image size and budget (4 epochs, cosine
schedule, the epoch kept chosen on the training holdout):

* ``flat``: one top over the 109 leaves (seed 0);
* ``hierarchical``: a router top over the 6 branches x one expert top per branch, each expert
  started from the trained flat top (HD-CNN); P(leaf) = P(branch) x P(leaf | branch);
* ``fused``: flat x hierarchical, geometric mean with weight alpha;
* ``flat x2``: the capacity control, the mean of two flat tops trained with seeds 0 and 1, so
  that a gain of the hierarchy is not just the gain of having more parameters;
* ``hierarchical, experts from pretrained``: the same router, experts started from the pretrained
  stage instead (the same budget as the flat top: 4 epochs each);
* ``flat, 2x epochs``: the budget control, one flat top trained twice as long: the experts start
  from the trained flat top, so the two-stage model has seen the flat top's epochs and its own;
* for reference, linear heads on the pooled features of the same frozen backbone (today's default).

Everything chosen is chosen on the holdout carved from train.bson (10% of its products, by each
model's seed): the early-stopping epoch, then the temperatures and the fusion weight. val.bson is
only scored. Each difference carries its paired-bootstrap 95% interval.

    .venv/bin/python experiments/fashion/tops.py --work /tmp/hierclass-tops            # train, then evaluate
    .venv/bin/python experiments/fashion/tops.py --work /tmp/hierclass-tops --evaluate  # evaluate trained runs

Writes ``tops.md`` and ``tops.json`` next to this file, and the full report under ``tops-report/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data" / "fashion"


def extract(data: Path, work: Path) -> None:
    from hierclass.features import extract_features

    tax = data / "category_names.csv"
    for split, top_stages, hflip in (("train", 1, True), ("val", 1, False), ("train", 0, False), ("val", 0, False)):
        out = work / (f"maps1-{split}" if top_stages else f"pooled-{split}")
        extract_features(
            data / f"{split}.bson", tax, out=out, image_size=128, top_stages=top_stages, hflip=hflip, progress=False
        )


def train(work: Path, epochs: int) -> dict[str, float]:
    from hierclass.config import TrainConfig
    from hierclass.featurestore import FeatureStore

    maps = FeatureStore.open(work / "maps1-train"), FeatureStore.open(work / "maps1-val")
    pooled = FeatureStore.open(work / "pooled-train"), FeatureStore.open(work / "pooled-val")
    return run_plan(
        work,
        [
            ("runA", "flat", maps, TrainConfig(epochs=epochs, patience=0)),
            ("runA", "router", maps, TrainConfig(epochs=epochs, patience=0)),
            ("runA", "experts", maps, TrainConfig(epochs=epochs, patience=0, init_from="flat")),
            ("runB", "flat", maps, TrainConfig(epochs=epochs, patience=0, seed=1)),
            ("runC", "flat", maps, TrainConfig(epochs=2 * epochs, patience=0)),
            ("runD", "router", maps, TrainConfig(epochs=epochs, patience=0)),  # the same as runA's (deterministic)
            ("runD", "experts", maps, TrainConfig(epochs=epochs, patience=0)),
            *((("pooled", kind, pooled, TrainConfig())) for kind in ("flat", "router", "experts")),
        ],
    )


def run_plan(work: Path, plan: list) -> dict[str, float]:
    """Train each ``(run name, kind, (train store, val store), TrainConfig)`` of ``plan`` into
    ``work/<run name>``, skipping heads trained before; the seconds each took."""
    from hierclass.engine import train_head
    from hierclass.run import Run
    from hierclass.taxonomy import Taxonomy

    seconds: dict[str, float] = {}
    for run_name, kind, (tr, va), config in plan:
        run = Run(work / run_name)
        if (run.head_dir(kind) / "meta.json").is_file():
            continue
        tax = Taxonomy.from_csv(tr.meta["taxonomy_source"])
        run.adopt_taxonomy(tax)
        t0 = time.perf_counter()
        train_head(kind, tr, va, tax, config, run.head_dir(kind), echo=print)
        seconds[f"{run_name}/{kind}"] = round(time.perf_counter() - t0, 1)
    return seconds


def evaluate(work: Path) -> dict:
    from hierclass.featurestore import FeatureStore
    from hierclass.inference import FlatClassifier, FusedClassifier
    from hierclass.metrics import mistake_severity, paired_comparison
    from hierclass.report import evaluate, write_report
    from hierclass.run import calibrate, calibration_record, load_models, training_holdout

    train_maps, val_maps = FeatureStore.open(work / "maps1-train"), FeatureStore.open(work / "maps1-val")
    from hierclass.taxonomy import Taxonomy

    tax = Taxonomy.from_csv(work / "runA" / "category_names.csv")
    models = load_models(work / "runA", tax)
    models["fused"] = FusedClassifier(models["flat"], models["hierarchical"])  # type: ignore[arg-type]
    if (work / "runD" / "experts" / "meta.json").is_file():
        models["hierarchical, experts from pretrained"] = load_models(work / "runD", tax)["hierarchical"]
    held = training_holdout(train_maps, models)
    calibrate(models, train_maps, tune_fused=True, rows=held)
    second = {"flat": FlatClassifier.from_run(work / "runB", tax)}
    calibrate(second, train_maps, rows=training_holdout(train_maps, second))
    longer = {"flat": FlatClassifier.from_run(work / "runC", tax)}
    calibrate(longer, train_maps, rows=training_holdout(train_maps, longer))
    report = evaluate(
        models,
        val_maps,
        calibration=calibration_record(train_maps, held),
        meta={"data": "real Fashion catalogue (val.bson)", "experiment": "CNN tops, cut 1, 128 px"},
    )
    write_report(report, HERE / "tops-report")

    leaf = np.asarray(val_maps.leaf)
    rows = np.flatnonzero(val_maps.valid & (leaf >= 0))
    feats = np.asarray(val_maps.features()[rows], dtype=np.float32)
    y = leaf[rows]
    proba = {name: clf.predict_proba(feats) for name, clf in models.items()}
    proba["flat x2"] = (proba["flat"] + second["flat"].predict_proba(feats)) / 2
    proba["flat, 2x epochs"] = longer["flat"].predict_proba(feats)
    pooled = load_models(work / "pooled", tax)
    val_pooled = FeatureStore.open(work / "pooled-val")
    if not np.array_equal(np.asarray(val_pooled.product_id)[rows], np.asarray(val_maps.product_id)[rows]):
        raise SystemExit("error: the pooled and map stores of val.bson hold different rows; extract both again")
    pooled_feats = np.asarray(val_pooled.features()[rows], dtype=np.float32)
    for name, clf in pooled.items():
        proba[f"pooled {name}"] = clf.predict_proba(pooled_feats)
    correct = {name: p.argmax(1) == y for name, p in proba.items()}
    out: dict = {"n_images": len(rows), "models": {}}
    for name, p in proba.items():
        pred = p.argmax(1)
        out["models"][name] = {
            "leaf_top1": float(correct[name].mean()),
            "level1": float((tax.leaf_level1[pred] == tax.leaf_level1[y]).mean()),
            "mistake_severity": float(mistake_severity(y, pred, tax)),
            "vs_flat": paired_comparison(correct[name], correct["flat"]),
            "vs_flat_x2": paired_comparison(correct[name], correct["flat x2"]),
            "vs_flat_2x_epochs": paired_comparison(correct[name], correct["flat, 2x epochs"]),
        }
    out["settings"] = {name: report[name]["settings"] for name in models}
    out["splits"] = report["meta"]["splits"]
    return out


def markdown(results: dict) -> str:
    def ci(c: dict) -> str:
        return f"{100 * c['diff']:+.2f} [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}]"

    lines = [
        "| model | leaf top-1 | vs flat top (95% CI) | vs flat x2 (95% CI) | vs flat, 2x epochs (95% CI) | level-1 "
        "| mistake severity |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in results["models"].items():
        lines.append(
            f"| {name} | {m['leaf_top1']:.4f} | {ci(m['vs_flat'])} | {ci(m['vs_flat_x2'])} | "
            f"{ci(m['vs_flat_2x_epochs'])} | "
            f"{m['level1']:.4f} | {m['mistake_severity']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train.bson, val.bson, category_names.csv")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-tops"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--evaluate", action="store_true", help="only evaluate runs trained before")
    args = parser.parse_args()
    seconds = {}
    if not args.evaluate:
        extract(args.data, args.work)
        seconds = train(args.work, args.epochs)
    results = evaluate(args.work)
    results["train_seconds"] = seconds
    (HERE / "tops.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (HERE / "tops.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
