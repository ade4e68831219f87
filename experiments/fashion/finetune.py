"""Fine-tuning from pixels against cached maps and frozen features, on the real Fashion catalogue.

One CNN is fine-tuned end to end from the images of ``train.bson`` at 128 px: the offline
ImageNet EfficientNet-Lite0 with its top two stages trainable (``--top-stages 2``), timm's train
augmentation (random resized crop, flip, colour jitter), label smoothing 0.1, 3 epochs, batch 128,
as ``hierclass train-flat --train train.bson ...`` does. Its fine-tuned backbone then serves as
the trunk of every other model here (HD-CNN style):

* ``fine-tuned flat CNN``: the fine-tuned network itself (its own classifier);
* ``pooled on fine-tuned``: linear flat, router and experts heads on the pooled features of the
  fine-tuned backbone (the hierarchical model needs one backbone for its router and experts);
* ``tops on fine-tuned``: the experiment of ``tops.py`` (cut 1, 4 epochs, experts started from
  the flat top) on the trunk maps of the fine-tuned backbone.

They are compared on the same val images with the models of ``tops.py``, which read the frozen
ImageNet backbone (run it first: this script reads its work folder): the cached-map tops and the
pooled linear heads.

Everything chosen is chosen on the holdout carved from train.bson (10% of its products): the
kept epoch, C, the temperatures. val.bson is only scored. Each difference carries its
paired-bootstrap 95% interval.

    .venv/bin/python experiments/fashion/finetune.py --work /tmp/hierclass-ft --tops-work /tmp/hierclass-tops

Writes ``finetune.md`` and ``finetune.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data" / "fashion"


def finetune(data: Path, work: Path, epochs: int) -> None:
    """Fine-tune the flat CNN from images with the CLI, unless it was done before (its head's
    meta.json records the seconds it took)."""
    if (work / "ft" / "flat" / "meta.json").is_file():
        return
    cmd = [
        sys.executable, "-m", "hierclass", "train-flat", "--train", str(data / "train.bson"),
        "--val", str(data / "val.bson"), "--taxonomy", str(data / "category_names.csv"),
        "--run", str(work / "ft"), "--image-size", "128", "--top-stages", "2",
        "--epochs", str(epochs), "--batch-size", "128", "--workers", "2", "--no-progress",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def extract(data: Path, work: Path) -> dict[str, float]:
    from hierclass.features import extract_features

    seconds = {}
    trunk = str(work / "ft" / "flat")
    tax = data / "category_names.csv"
    for split, top_stages, hflip in (("train", 1, True), ("val", 1, False), ("train", 0, False), ("val", 0, False)):
        out = work / (f"maps1-{split}" if top_stages else f"pooled-{split}")
        if (out / "meta.json").is_file():
            continue
        t0 = time.perf_counter()
        extract_features(
            data / f"{split}.bson", tax, pretrained=trunk, out=out, image_size=128,
            top_stages=top_stages, hflip=hflip, progress=False,
        )  # fmt: skip
        seconds[out.name] = round(time.perf_counter() - t0, 1)
    return seconds


def train(work: Path, epochs: int) -> dict[str, float]:
    from tops import run_plan

    from hierclass.config import TrainConfig
    from hierclass.featurestore import FeatureStore

    maps = FeatureStore.open(work / "maps1-train"), FeatureStore.open(work / "maps1-val")
    pooled = FeatureStore.open(work / "pooled-train"), FeatureStore.open(work / "pooled-val")
    return run_plan(
        work,
        [
            ("tops", "flat", maps, TrainConfig(epochs=epochs, patience=0)),
            ("tops", "router", maps, TrainConfig(epochs=epochs, patience=0)),
            ("tops", "experts", maps, TrainConfig(epochs=epochs, patience=0, init_from="flat")),
            *((("pooled", kind, pooled, TrainConfig())) for kind in ("flat", "router", "experts")),
        ],
    )


def evaluate(work: Path, tops_work: Path) -> dict:
    from hierclass.featurestore import FeatureStore
    from hierclass.inference import FlatClassifier
    from hierclass.metrics import mistake_severity, paired_comparison
    from hierclass.run import calibrate, load_models, training_holdout
    from hierclass.taxonomy import Taxonomy

    tax = Taxonomy.from_csv(work / "ft" / "category_names.csv")
    # (store folder, train store for the holdout, models) per feature space
    spaces = {
        "frozen maps": (tops_work / "maps1", load_models(tops_work / "runA", tax)),
        "frozen pooled": (tops_work / "pooled", load_models(tops_work / "pooled", tax)),
        "fine-tuned maps": (work / "maps1", load_models(work / "tops", tax)),
        "fine-tuned pooled": (work / "pooled", load_models(work / "pooled", tax)),
    }
    spaces["fine-tuned pooled"][1]["fine-tuned CNN"] = FlatClassifier.from_run(work / "ft", tax)
    names = {
        ("frozen maps", "flat"): "tops, frozen: flat",
        ("frozen maps", "hierarchical"): "tops, frozen: hierarchical",
        ("frozen pooled", "flat"): "pooled, frozen: flat",
        ("frozen pooled", "hierarchical"): "pooled, frozen: hierarchical",
        ("fine-tuned pooled", "fine-tuned CNN"): "fine-tuned flat CNN",
        ("fine-tuned pooled", "flat"): "pooled, fine-tuned: flat",
        ("fine-tuned pooled", "hierarchical"): "pooled, fine-tuned: hierarchical",
        ("fine-tuned maps", "flat"): "tops, fine-tuned: flat",
        ("fine-tuned maps", "hierarchical"): "tops, fine-tuned: hierarchical",
    }
    proba: dict[str, np.ndarray] = {}
    reference = None
    for space, (prefix, models) in spaces.items():
        train_store = FeatureStore.open(f"{prefix}-train")
        val_store = FeatureStore.open(f"{prefix}-val")
        models = {k: v for k, v in models.items() if (space, k) in names}
        for name, clf in models.items():  # temperatures on each model's own training holdout
            calibrate({name: clf}, train_store, rows=training_holdout(train_store, {name: clf}))
        leaf = np.asarray(val_store.leaf)
        rows = np.flatnonzero(val_store.valid & (leaf >= 0))
        key = np.asarray(val_store.product_id)[rows], np.asarray(val_store.image_number)[rows], leaf[rows]
        if reference is None:
            reference = key
        elif not all(np.array_equal(a, b) for a, b in zip(key, reference, strict=True)):
            raise SystemExit(f"error: {prefix}-val holds other rows than the first store; extract both again")
        feats = np.asarray(val_store.features()[rows], dtype=np.float32)
        for name, clf in models.items():
            proba[names[(space, name)]] = clf.predict_proba(feats)
    assert reference is not None
    y = reference[2]
    correct = {name: p.argmax(1) == y for name, p in proba.items()}
    base = "tops, frozen: flat"
    out: dict = {"n_images": int(len(y)), "models": {}}
    for name in names.values():
        pred = proba[name].argmax(1)
        out["models"][name] = {
            "leaf_top1": float(correct[name].mean()),
            "level1": float((tax.leaf_level1[pred] == tax.leaf_level1[y]).mean()),
            "mistake_severity": float(mistake_severity(y, pred, tax)),
            "vs_frozen_tops_flat": paired_comparison(correct[name], correct[base]),
            "vs_finetuned_cnn": paired_comparison(correct[name], correct["fine-tuned flat CNN"]),
        }
        if "fine-tuned:" in name:  # the same model on the frozen ImageNet backbone
            frozen = correct[name.replace("fine-tuned:", "frozen:")]
            out["models"][name]["vs_same_on_frozen"] = paired_comparison(correct[name], frozen)
    return out


def markdown(results: dict) -> str:
    def ci(c: dict) -> str:
        return f"{100 * c['diff']:+.2f} [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}]"

    lines = [
        f"Image-level leaf top-1 on Fashion val.bson ({results['n_images']:,} images), 128 px. "
        "Epochs, C and temperatures chosen on the holdout carved from train.bson; val only scored.",
        "",
        "| model | leaf top-1 | vs frozen flat top (95% CI) | vs fine-tuned flat CNN (95% CI) "
        "| vs the same model on the frozen backbone (95% CI) | level-1 | mistake severity |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in results["models"].items():
        lines.append(
            f"| {name} | {m['leaf_top1']:.4f} | {ci(m['vs_frozen_tops_flat'])} | {ci(m['vs_finetuned_cnn'])} "
            f"| {ci(m['vs_same_on_frozen']) if 'vs_same_on_frozen' in m else ''} "
            f"| {m['level1']:.4f} | {m['mistake_severity']:.3f} |"
        )
    if results.get("seconds"):
        lines += ["", "Seconds (2-core CPU): " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train.bson, val.bson, category_names.csv")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hierclass-ft"))
    parser.add_argument("--tops-work", type=Path, default=Path("/tmp/hierclass-tops"), help="tops.py's work folder")
    parser.add_argument("--ft-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the CNN tops")
    args = parser.parse_args()
    finetune(args.data, args.work, args.ft_epochs)
    seconds = {**extract(args.data, args.work), **train(args.work, args.epochs)}
    results = evaluate(args.work, args.tops_work)
    done = HERE / "finetune.json"
    if done.is_file():  # keep the timings of the steps done by earlier runs
        seconds = {**json.loads(done.read_text()).get("seconds", {}), **seconds}
    trained = json.loads((args.work / "ft" / "flat" / "meta.json").read_text())["metrics"]
    results["seconds"] = {f"fine-tune ({trained['epochs_run']} epochs)": round(trained["seconds"], 1), **seconds}
    done.write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "finetune.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
