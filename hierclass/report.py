"""Flat-vs-hierarchical evaluation reports and prediction CSVs.

:func:`evaluate` scores several classifiers on one feature store, image by image and product
by product; :func:`write_report` writes ``report.json``, ``report.md`` and PNG plots;
:func:`write_predictions` writes a Kaggle-format submission (``_id,category_id``).

``report.json`` layout (every float is a fraction in [0, 1] unless named otherwise; a
metric that cannot be computed, e.g. mistake severity with no mistakes, is ``null``)::

    {
      "meta": {"models": ["flat", "hierarchical", ...], "features": ..., "aggregation": "mean",
               "tta": false, "abstain_threshold": null, "taxonomy": {...}, "n_bins": 15,
               "splits": {"early_stopping", "calibration", "scored"}: which images chose what,
               "warnings": [...] (e.g. calibrated on the scored images), ...},
      "flat": {
        # image-level figures, at the top so they are read first
        "leaf_top1", "leaf_top5", "level1_acc", "level2_acc", "macro_f1",
        "hierarchical_precision", "hierarchical_recall", "hierarchical_f1",
        "mistake_severity" (mean tree distance over errors, 1..3), "ece",
        "n_images", "n_products", "ms_per_1000_images" (heads only, features given),
        "per_branch": [{"branch", "name", "n_leaves", "n", "leaf_acc", "level1_acc"}, ...],
        "reliability": [{"lo", "hi", "count", "confidence", "accuracy"}, ...],
        "abstention": [{"threshold", "leaf_coverage", "leaf_acc", "answered_acc", ...}, ...],
        "product": {the same metric keys, tables included, computed on products (images
                    aggregated), with "n" the number of labelled products},
        "settings": {how this model was run: combine, k, temperatures, alpha, ...}
      },
      # every model but flat, when flat is scored: "vs_flat" (also in "product") =
      #   {"diff", "ci_low", "ci_high" (paired bootstrap 95%), "mcnemar_p", "wins", "losses", "n", "verdict"}
      "hierarchical": {... the same, plus "router_acc" and "oracle_leaf_top1" (experts
                       given the true branch), in the image and product dicts, and
                       "router_acc" in each per-branch row},
      "<variant>": {... any further classifier passed in, e.g. "fused"}
    }

Every top-level key but ``meta`` is a model, listed in ``meta.models``.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hierclass.atomic import atomic_open
from hierclass.featurestore import FeatureStore, FeatureStoreError, write_json_atomic
from hierclass.inference import (
    Aggregation,
    Classifier,
    HierarchicalClassifier,
    Predictions,
    predict_store,
    settings_of,
)
from hierclass.metrics import N_BINS, abstention_depth, branch_confusion, paired_comparison, summarize
from hierclass.run import check_store, early_stopping_source
from hierclass.taxonomy import Taxonomy

RESERVED = ("meta",)
BASELINE = "flat"  # every other model gets a verdict against it
MAX_CONFUSION_LEAVES = 60  # a confusion matrix of a larger branch is unreadable as a PNG
MAX_CONFUSION_PLOTS = 12  # the most scored branches get one
MIN_BRANCHES_FOR_SIZE_PLOT = 10  # accuracy against branch size says little with fewer points
MAIN_METRICS = (
    ("leaf_top1", "leaf top-1"),
    ("leaf_top5", "leaf top-5"),
    ("level1_acc", "level-1 accuracy"),
    ("level2_acc", "level-2 accuracy"),
    ("macro_f1", "leaf macro-F1"),
    ("hierarchical_f1", "hierarchical F1"),
    ("mistake_severity", "mistake severity (tree distance, 1-3)"),
    ("ece", "ECE (15 bins)"),
    ("router_acc", "router accuracy"),
    ("oracle_leaf_top1", "leaf top-1, experts given the true branch"),
)
PLOTS = {
    "per_branch": "per_branch.png",
    "branch_size": "branch_size.png",
    "reliability": "reliability.png",
    "coverage": "coverage.png",
}


def evaluate(
    classifiers: Mapping[str, Classifier],
    store: FeatureStore,
    *,
    how: Aggregation = "mean",
    tta: bool = False,
    abstain_threshold: float | None = None,
    chunk_images: int = 8192,
    meta: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score classifiers on the labelled images of a feature store, and on its products.

    Args:
        classifiers: name -> classifier, e.g. ``{"flat": ..., "hierarchical": ..., "fused": ...}``.
        store: the features (labels in ``store.leaf``; unlabelled rows are not scored).
        how: how a product's images are aggregated (see :func:`hierclass.inference.aggregate`).
        tta: average with the horizontally flipped view (the store must have it).
        abstain_threshold: also report accuracy and coverage at this confidence threshold.
        chunk_images: images per inference chunk (memory bound).
        meta: extra fields for ``report["meta"]``.
        calibration: where the temperatures and fusion weights were fitted, if they were:
            ``{"store": path, "rows": "holdout" or "all", "n_images": count}`` (see
            :func:`calibration_record`). Recorded in ``meta.splits``; fitting them on the scored
            images themselves adds a warning to ``meta.warnings``.

    Returns:
        The report (the ``report.json`` layout in this module's docstring).
    """
    for name in classifiers:
        if name in RESERVED:
            raise ValueError(f"a model cannot be called {name!r}: the name is reserved in report.json")
    if not classifiers:
        raise ValueError("classifiers is empty; pass at least one model to evaluate")
    taxonomy = next(iter(classifiers.values())).taxonomy
    check_store(store, classifiers)
    if tta and "hflip" not in store.meta.get("views", []):
        raise FeatureStoreError(f"{store.root}: no 'hflip' features for --tta; extract the features with --hflip")
    if not (store.leaf[store.valid] >= 0).any():
        raise FeatureStoreError(
            f"{store.root}: no labelled images to score (no category_id of the taxonomy); "
            "use `hierclass predict` for unlabelled data"
        )
    report: dict[str, Any] = {
        "meta": {
            "models": list(classifiers),
            "features": str(store.root),
            "backbone": store.meta.get("backbone"),
            "aggregation": how,
            "tta": tta,
            "abstain_threshold": abstain_threshold,
            "n_bins": N_BINS,
            "taxonomy": {"source": taxonomy.source, "fingerprint": taxonomy.fingerprint, **taxonomy.stats()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "splits": splits_record(classifiers, store, calibration),
            "warnings": calibration_warnings(store, calibration),
            **dict(meta or {}),
        }
    }
    correct: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, clf in classifiers.items():
        images, products = predict_store(
            clf, store, how=how, tta=tta, chunk_images=chunk_images, oracle=isinstance(clf, HierarchicalClassifier)
        )
        report[name] = model_report(images, products, taxonomy, abstain_threshold, settings_of(clf))
        correct[name] = (_correct(images), _correct(products))
    if BASELINE in classifiers:
        base_images, base_products = correct[BASELINE]
        for name in classifiers:
            if name != BASELINE:
                report[name]["vs_flat"] = paired_comparison(correct[name][0], base_images)
                report[name]["product"]["vs_flat"] = paired_comparison(correct[name][1], base_products)
    return report


def splits_record(
    classifiers: Mapping[str, Classifier], store: FeatureStore, calibration: Mapping[str, Any] | None
) -> dict[str, str]:
    """Which images chose what: the heads' settings, the temperatures and fusion weights, the scores."""
    if calibration is None:
        calibrated = "not fitted (temperatures 1, fusion weight as given)"
    elif calibration["rows"] == "mixed":
        calibrated = f"each member of the ensemble on its own split: {calibration['store']}"
    elif calibration["rows"] == "holdout":
        calibrated = f"the {calibration['n_images']} held-out images of the training set {calibration['store']}"
    else:
        calibrated = f"all {calibration['n_images']} labelled images of {calibration['store']}"
    return {
        "early_stopping": early_stopping_source(classifiers) or "not recorded by the heads",
        "calibration": calibrated,
        "scored": f"{int((store.valid & (store.leaf >= 0)).sum())} labelled images of {store.root}",
    }


def calibration_warnings(store: FeatureStore, calibration: Mapping[str, Any] | None) -> list[str]:
    """A warning when temperatures and fusion weights were fitted on the very images scored."""
    if calibration is None or calibration["rows"] != "all":
        return []
    if Path(calibration["store"]).resolve() != Path(store.root).resolve():
        return []
    return [
        f"temperatures and fusion weights were fitted on the scored images themselves ({store.root}): "
        "the calibrated and fused figures (accuracy, ECE, verdicts) are optimistic; calibrate on the "
        "training set's holdout instead (--calibrate TRAIN_FEATURES)"
    ]


def _correct(preds: Predictions) -> np.ndarray:
    """Whether each labelled sample's top leaf is right (in the predictions' order)."""
    known = preds.leaf >= 0
    return preds.pred[known] == preds.leaf[known]


def model_report(
    images: Predictions,
    products: Predictions,
    taxonomy: Taxonomy,
    abstain_threshold: float | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One model's entry of ``report.json`` from its image- and product-level predictions."""
    image = summarize(images, taxonomy, abstain_threshold=abstain_threshold)
    product = summarize(products, taxonomy, abstain_threshold=abstain_threshold)
    n_images = image.pop("n")
    entry = {
        **image,
        "n_images": n_images,
        "n_products": product["n"],
        "ms_per_1000_images": 1e6 * images.seconds / max(len(images), 1),
        "branch_confusion": branch_confusions(images, taxonomy),
        "product": product,
        "settings": dict(settings or {}),
    }
    return entry


def branch_confusions(images: Predictions, taxonomy: Taxonomy) -> list[dict[str, Any]]:
    """The confusion counts of the branches a matrix can show (2 to ``MAX_CONFUSION_LEAVES`` leaves, scored
    images), the most scored first, at most ``MAX_CONFUSION_PLOTS``; sparse: ``cells`` are
    ``[true local leaf, predicted local leaf (branch size: another branch), count]``."""
    known = images.leaf >= 0
    y, pred = images.leaf[known], images.pred[known]
    n = np.bincount(taxonomy.leaf_level1[y], minlength=taxonomy.n_level1)
    sizes = taxonomy.branch_sizes
    shown = [b for b in np.argsort(-n, kind="stable") if n[b] and 2 <= sizes[b] <= MAX_CONFUSION_LEAVES]
    out = []
    for b in shown[:MAX_CONFUSION_PLOTS]:
        m = branch_confusion(y, pred, taxonomy, int(b))
        t, p = np.nonzero(m)
        out.append(
            {
                "branch": int(b),
                "name": taxonomy.level1_names[b],
                "leaves": [taxonomy.leaf_path(int(leaf))[2] for leaf in taxonomy.branch_leaves(int(b))],
                "cells": [[int(i), int(j), int(m[i, j])] for i, j in zip(t, p, strict=True)],
            }
        )
    return out


def models_of(report: Mapping[str, Any]) -> list[str]:
    """The model names of a report, in order."""
    return list(report["meta"]["models"])


# ---------------------------------------------------------------------------- writing
def write_report(report: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.json``, the PNG plots and ``report.md`` (which embeds them) into ``out_dir``.

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "report.json", report)
    plots = write_plots(report, out_dir)
    md = out_dir / "report.md"
    with atomic_open(md, "w", encoding="utf-8") as f:
        f.write(markdown(report, plots))
    return md


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_table(report: Mapping[str, Any], level: str) -> str:
    names = models_of(report)
    entries = {n: report[n] if level == "image" else report[n]["product"] for n in names}
    rows = []
    for key, label in MAIN_METRICS:
        if any(key in e for e in entries.values()):
            rows.append([label, *(entries[n].get(key) for n in names)])
    count = "n_images" if level == "image" else "n"
    rows.append([f"{level}s scored", *(entries[n].get(count) for n in names)])
    if level == "image":
        rows.append(["ms per 1000 images (heads)", *(f"{report[n]['ms_per_1000_images']:.1f}" for n in names)])
    return _table(["metric", *names], rows)


def verdict_text(name: str, comparison: Mapping[str, Any], unit: str = "images") -> str:
    """One model's verdict against flat, in one line: difference, 95% interval, McNemar p, verdict."""
    c = comparison
    if c.get("diff") is None:
        return f"{name} vs {BASELINE}: no {unit} to compare"
    return (
        f"{name} vs {BASELINE}: {100 * c['diff']:+.2f} points leaf top-1 "
        f"(95% CI {100 * c['ci_low']:+.2f} to {100 * c['ci_high']:+.2f}, paired bootstrap), "
        f"McNemar p={c['mcnemar_p']:.3g} ({c['wins']} {unit} won, {c['losses']} lost of {c['n']}): "
        f"{c['verdict']}"
    )


def verdict_lines(report: Mapping[str, Any], level: str = "image") -> list[str]:
    """The verdict of every model that has one (every model but flat, when flat was scored)."""
    lines = []
    for name in models_of(report):
        entry = report[name] if level == "image" else report[name]["product"]
        if "vs_flat" in entry:
            lines.append(verdict_text(name, entry["vs_flat"], f"{level}s"))
    return lines


def markdown(report: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """The human-readable report."""
    meta = report["meta"]
    names = models_of(report)
    tax = meta["taxonomy"]
    out = [
        "# Flat vs hierarchical evaluation",
        "",
        f"Features `{meta['features']}` (backbone {meta.get('backbone')}); taxonomy `{tax['source']}` "
        f"({tax['level1']} level-1, {tax['level2']} level-2, {tax['leaves']} leaves, "
        f"fingerprint {tax['fingerprint']}). "
        f"Products aggregate their images by `{meta['aggregation']}`"
        + (", with horizontal-flip test-time augmentation." if meta["tta"] else "."),
        "",
        "Level-1 and level-2 predictions are the ancestors of the predicted leaf, so the three levels of a "
        "prediction are one path of the tree. Hierarchical F1 is the set-based hF1 of Kiritchenko et al.; "
        "mistake severity is the mean tree distance (1 same level 2, 2 same level 1, 3 other branch) over errors.",
        "",
        *(f"> **Warning:** {w}\n" for w in meta.get("warnings", [])),
        "## Models",
        "",
        _table(["model", "settings"], [[n, _settings_text(report[n]["settings"])] for n in names]),
        "",
        *_splits_markdown(meta),
        *_verdict_markdown(report),
        "## Images",
        "",
        _metric_table(report, "image"),
        "",
        *_products_markdown(report),
        "## Per branch (images)",
        "",
        _per_branch_markdown(report),
        "",
    ]
    if "per_branch" in plots:
        out += [f"![per-branch leaf accuracy]({plots['per_branch']})", ""]
    if "branch_size" in plots:
        out += [f"![accuracy against branch size]({plots['branch_size']})", ""]
    out += _confusion_markdown(report, plots)
    out += ["## Calibration", "", _table(["model", "ECE images", "ECE products"], [
        [n, report[n]["ece"], report[n]["product"]["ece"]] for n in names
    ]), ""]  # fmt: skip
    if "reliability" in plots:
        out += [f"![reliability diagram]({plots['reliability']})", ""]
    out += ["## Abstention: accuracy against coverage (images)", "", _abstention_markdown(report), ""]
    if "coverage" in plots:
        out += [f"![accuracy against coverage]({plots['coverage']})", ""]
    return "\n".join(out)


def one_image_per_product(report: Mapping[str, Any]) -> bool:
    """Whether every scored product has exactly one image (product figures then repeat the image ones)."""
    return all(report[n]["n_products"] == report[n]["n_images"] for n in models_of(report))


def _products_markdown(report: Mapping[str, Any]) -> list[str]:
    if one_image_per_product(report):
        return ["## Products", "", "Every product has one image: the product figures are the image figures.", ""]
    return ["## Products", "", _metric_table(report, "product"), ""]


def featured_model(report: Mapping[str, Any]) -> str:
    """The model whose errors the report details: the hierarchical one if scored, else the first."""
    names = models_of(report)
    return "hierarchical" if "hierarchical" in names else names[0]


def _confusion_markdown(report: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
    names = models_of(report)
    rows = []
    for n in names:
        for pair in report[n].get("confused_pairs", [])[:5]:
            rows.append(
                [
                    n,
                    pair["true_name"],
                    pair["pred_name"],
                    pair["count"],
                    pair["share"],
                    "yes" if pair["same_branch"] else "no",
                ]
            )
    out = ["## Most confused leaf pairs (images)", ""]
    if not rows:
        return [*out, "No errors.", ""]
    out += [
        "The five most frequent errors of each model; *share* is of the true leaf's images.",
        "",
        _table(["model", "true leaf", "predicted leaf", "images", "share", "same branch"], rows),
        "",
    ]
    confusion = [k for k in plots if k.startswith("confusion_")]
    if confusion:
        out += [
            f"Confusion matrices of the {featured_model(report)} model per level-1 branch (rows: true leaf, "
            "normalised; last column: predicted in another branch):",
            "",
            *(f"![confusion matrix]({plots[k]})" for k in confusion),
            "",
        ]
    return out


def _splits_markdown(meta: Mapping[str, Any]) -> list[str]:
    splits = meta.get("splits")
    if not splits:
        return []
    return [
        "Which images chose what:",
        "",
        f"- heads' settings (L2 strength, early-stopping epoch): {splits['early_stopping']}",
        f"- temperatures and fusion weight: {splits['calibration']}",
        f"- scored on: {splits['scored']}",
        "",
    ]


def _verdict_markdown(report: Mapping[str, Any]) -> list[str]:
    images, products = verdict_lines(report, "image"), verdict_lines(report, "product")
    if one_image_per_product(report):
        products = []  # the same figures as the images'
    if not images:
        return []
    return [
        f"## Verdict against {BASELINE}",
        "",
        "Leaf top-1 difference on the same images (then products, when they have several images), its "
        "paired-bootstrap 95% interval "
        "and McNemar's exact p. *better* / *worse* when the interval excludes 0.",
        "",
        *(f"- {line}" for line in images + products),
        "",
    ]


def _settings_text(settings: Mapping[str, Any]) -> str:
    shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in settings.items()}
    return ", ".join(f"{k}={v}" for k, v in shown.items() if v is not None and not isinstance(v, dict)) or "–"


def _per_branch_markdown(report: Mapping[str, Any]) -> str:
    names = models_of(report)
    first = report[names[0]]["per_branch"]
    header = ["branch", "leaves", "images", *(f"{n} leaf acc" for n in names)]
    router = [n for n in names if "router_acc" in report[n]["per_branch"][0]]
    header += [f"{n} router acc" for n in router]
    rows = []
    for i, row in enumerate(first):
        if not row["n"]:
            continue
        rows.append(
            [
                row["name"],
                row["n_leaves"],
                row["n"],
                *(report[n]["per_branch"][i]["leaf_acc"] for n in names),
                *(report[n]["per_branch"][i]["router_acc"] for n in router),
            ]
        )
    return _table(header, rows)


def _abstention_markdown(report: Mapping[str, Any]) -> str:
    names = models_of(report)
    header = ["threshold"]
    for n in names:
        header += [f"{n} leaf coverage", f"{n} leaf acc", f"{n} answered acc"]
    rows = []
    for i, r in enumerate(report[names[0]]["abstention"]):
        row: list[Any] = [f"{r['threshold']:g}"]
        for n in names:
            a = report[n]["abstention"][i]
            row += [a["leaf_coverage"], a["leaf_acc"], a["answered_acc"]]
        rows.append(row)
    text = _table(header, rows)
    t = report["meta"].get("abstain_threshold")
    if t is not None:
        text += (
            f"\n\nAt the chosen threshold {t}, a prediction below it answers only its level-2 node (or level-1 "
            "branch) when that node's probability reaches the threshold; *answered acc* counts an answer right "
            "when it is right down to the depth given."
        )
    return text


def write_plots(report: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """Write the PNG plots (matplotlib, Agg); return plot name -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = models_of(report)
    done: dict[str, str] = {}
    rows0 = report[names[0]]["per_branch"]
    present = [i for i, r in enumerate(rows0) if r["n"]]

    def save(fig: Any, key: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS[key], dpi=100)
        plt.close(fig)
        done[key] = PLOTS[key]

    if present:
        fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.12 * len(present) * len(names) + 2)), 4.5))
        width = 0.8 / len(names)
        x = np.arange(len(present))
        every = [report[n]["per_branch"][i]["leaf_acc"] for n in names for i in present]
        for j, n in enumerate(names):
            acc = [report[n]["per_branch"][i]["leaf_acc"] for i in present]
            ax.bar(x + j * width - 0.4 + width / 2, acc, width, label=n)
        labels = [f"{rows0[i]['name'][:18]} (n={rows0[i]['n']})" for i in present]
        ax.set_xticks(x, labels, rotation=75, fontsize=7)
        ax.set_ylabel("leaf accuracy (images)")
        low, high = min(every), max(every)
        pad = max(0.02, 0.1 * (high - low))  # zoomed on the bars: the differences are a few points
        ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
        ax.set_title("Leaf accuracy per level-1 branch (zoomed axis; n = images)")
        ax.legend()
        save(fig, "per_branch")

    if len(present) >= MIN_BRANCHES_FOR_SIZE_PLOT:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for n in names:
            sizes = [rows0[i]["n_leaves"] for i in present]
            acc = [report[n]["per_branch"][i]["leaf_acc"] for i in present]
            ax.scatter(sizes, acc, label=n, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("leaves in the branch")
        ax.set_ylabel("leaf accuracy (images)")
        ax.set_ylim(0, 1.02)
        ax.set_title("Accuracy against branch size")
        ax.legend()
        save(fig, "branch_size")

    for block in report[featured_model(report)].get("branch_confusion", []):
        size = len(block["leaves"])
        m = np.zeros((size, size + 1))
        for t, p, c in block["cells"]:
            m[t, p] = c
        counts = m.sum(axis=1, keepdims=True)
        share = np.divide(m, counts, out=np.zeros_like(m), where=counts > 0)
        side = min(12.0, 3.0 + 0.22 * size)
        fig, ax = plt.subplots(figsize=(side + 1.0, side))
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        names_ = [leaf[:24] for leaf in block["leaves"]]
        font = 7 if size <= 20 else 5
        ax.set_xticks(np.arange(size + 1), [*names_, "(other branch)"], rotation=90, fontsize=font)
        ax.set_yticks(
            np.arange(size), [f"{n} ({int(c)})" for n, c in zip(names_, counts[:, 0], strict=True)], fontsize=font
        )
        ax.set_xlabel("predicted leaf")
        ax.set_ylabel("true leaf (images)")
        ax.set_title(f"{block['name'][:40]}: {featured_model(report)}, row-normalised")
        fig.colorbar(image, ax=ax, fraction=0.04)
        key = f"confusion_{block['branch']}"
        fig.tight_layout()
        fig.savefig(out_dir / f"{key}.png", dpi=100)
        plt.close(fig)
        done[key] = f"{key}.png"

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for n in names:
        bins = [b for b in report[n]["reliability"] if b["count"]]
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            label=f"{n} (ECE {report[n]['ece']:.3f})",
        )
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram (images)")
    ax.legend()
    save(fig, "reliability")

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for n in names:
        pts = [(r["leaf_coverage"], r["leaf_acc"]) for r in report[n]["abstention"] if r["leaf_acc"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
    ax.set_xlabel("leaf coverage (share answered down to the leaf)")
    ax.set_ylabel("leaf accuracy on those")
    ax.set_title("Accuracy against coverage (images)")
    ax.legend()
    save(fig, "coverage")
    return done


# ---------------------------------------------------------------------------- predictions CSV
def fill_missing_products(
    products: Predictions, product_ids: np.ndarray, product_rows: np.ndarray | None = None
) -> tuple[Predictions, int]:
    """One prediction per product of ``product_ids`` (in that order), so a submission lists every product.

    A product with no usable image gets the leaves most often predicted for the others,
    with their share of predictions as probability.

    Args:
        products: product predictions (:func:`~hierclass.inference.predict_store`).
        product_ids: the ``_id`` of each product wanted.
        product_rows: the row of each product wanted in the source; predictions are matched by
            their ``product_row`` then (two products may share an ``_id``). None: matched by id.

    Returns:
        The predictions in ``product_ids`` order and the number of products filled in.
    """
    product_ids = np.asarray(product_ids, dtype=np.int64)
    if product_rows is None:
        have, wanted = products.ids, product_ids
    elif products.product_row is None:
        raise ValueError("product_rows given, but the predictions record no product_row; pass product predictions")
    else:
        have, wanted = products.product_row, np.asarray(product_rows, dtype=np.int64)
    if len(wanted) != len(product_ids):
        raise ValueError(f"product_rows has {len(wanted)} entries for {len(product_ids)} product_ids")
    pos = {int(p): i for i, p in enumerate(have)}
    where = np.array([pos.get(int(p), -1) for p in wanted], dtype=np.int64)
    missing = where < 0
    k = products.topk_leaf.shape[1]
    counts = np.bincount(products.pred, minlength=1)
    common = np.argsort(-counts, kind="stable")[:k]
    share = (counts[common] / max(counts.sum(), 1)).astype(np.float32)
    if len(common) < k:  # fewer distinct leaves than k: repeat the last
        common = np.r_[common, np.full(k - len(common), common[-1])]
        share = np.r_[share, np.zeros(k - len(share), np.float32)]
    take = np.maximum(where, 0)

    def pick(a: np.ndarray, fill: Any) -> np.ndarray:
        out = a[take].copy()
        out[missing] = fill
        return out

    filled = Predictions(
        product_ids,
        pick(products.leaf, -1),
        pick(products.topk_leaf, common),
        pick(products.topk_prob, share),
        pick(products.level1_prob, share[0]),
        pick(products.level2_prob, share[0]),
        product_row=None if product_rows is None else wanted,
    )
    return filled, int(missing.sum())


def submission_products(
    products: Predictions, product_ids: np.ndarray, product_rows: np.ndarray
) -> tuple[Predictions, int, np.ndarray]:
    """The predictions a submission writes: one per ``_id``, for every product of a source.

    Kaggle takes one row per ``_id``. When products share an ``_id`` (a dump that repeats
    one; its index reports it), the first of them in the order given keeps the row and the
    others are left out; the caller names the repeated ids.

    Args:
        products: product predictions (:func:`~hierclass.inference.predict_store`).
        product_ids: the ``_id`` of each product of the source.
        product_rows: the source row of each of them (what the predictions' ``product_row`` hold).

    Returns:
        ``(predictions, filled, repeated)``: one prediction per distinct ``_id``, in the order
        of their first products (``product_row``: the rows kept), how many products had no
        usable image and got the most predicted leaves (see :func:`fill_missing_products`), and
        the ``_id``s more than one product has, in order of first appearance.
    """
    product_ids = np.asarray(product_ids, dtype=np.int64)
    product_rows = np.asarray(product_rows, dtype=np.int64)
    if len(product_rows) != len(product_ids):
        raise ValueError(f"product_rows has {len(product_rows)} entries for {len(product_ids)} product_ids")
    _, first, counts = np.unique(product_ids, return_index=True, return_counts=True)
    keep = np.sort(first)
    repeated = product_ids[np.sort(first[counts > 1])]
    filled, missing = fill_missing_products(products, product_ids[keep], product_rows[keep])
    return filled, missing, repeated


def submission_rows(
    products: Predictions,
    taxonomy: Taxonomy,
    *,
    topk: int = 0,
    abstain_threshold: float | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of a prediction CSV, one row per product.

    Columns: ``_id,category_id`` (Kaggle's submission format); with ``abstain_threshold``,
    ``depth,level1,level2`` follow (``category_id`` is empty when the answer stops at level
    2 or 1); with ``topk`` K, ``top{i}_category_id,top{i}_level1,top{i}_level2,top{i}_level3,
    top{i}_prob`` for i = 1..K.
    """
    if topk > products.topk_leaf.shape[1]:
        raise ValueError(f"topk={topk} but only {products.topk_leaf.shape[1]} leaves were kept per product")
    header = ["_id", "category_id"]
    depth = None
    if abstain_threshold is not None:
        header += ["depth", "level1", "level2"]
        depth = abstention_depth(products, abstain_threshold)
    for i in range(1, topk + 1):
        header += [f"top{i}_category_id", f"top{i}_level1", f"top{i}_level2", f"top{i}_level3", f"top{i}_prob"]
    rows = []
    for j in range(len(products)):
        leaf = int(products.pred[j])
        row: list[Any] = [int(products.ids[j]), int(taxonomy.leaf_ids[leaf])]
        if depth is not None:
            l1, l2, _ = taxonomy.leaf_path(leaf)
            d = int(depth[j])
            row[1] = row[1] if d == 3 else ""
            row += [d, l1, l2 if d >= 2 else ""]
        for i in range(topk):
            t = int(products.topk_leaf[j, i])
            row += [int(taxonomy.leaf_ids[t]), *taxonomy.leaf_path(t), f"{float(products.topk_prob[j, i]):.6f}"]
        rows.append(row)
    return header, rows


def write_predictions(
    path: str | Path,
    products: Predictions,
    taxonomy: Taxonomy,
    *,
    topk: int = 0,
    abstain_threshold: float | None = None,
) -> Path:
    """Write the prediction CSV (see :func:`submission_rows`) atomically: a temporary file, then a rename."""
    path = Path(path)
    header, rows = submission_rows(products, taxonomy, topk=topk, abstain_threshold=abstain_threshold)
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path
