"""hierclass against scikit-learn and HiClass, fitted on the very same feature stores.

For each catalogue (a training store, optionally a stratified share of it, and a test store)
this fits, with default options and timed:

* hierclass: ``train_head`` flat, router and experts (default TrainConfig), scored with
  ``FlatClassifier`` and ``HierarchicalClassifier`` (soft routing, P(branch) x P(leaf | branch));
* scikit-learn: ``StandardScaler`` + ``LogisticRegression(C, max_iter=300)`` on the leaf ids;
* HiClass: ``LocalClassifierPerParentNode(LogisticRegression(C, max_iter=300))`` on the paths
  ``[level1, level1/level2, leaf]``.

The peers run in another interpreter (``--peer-python``, a venv with ``hiclass`` and
``scikit-learn``), one catalogue at a time, never beside hierclass's own training. Scores are
image-level leaf top-1 on the test store, with a 95% paired-bootstrap interval of each
hierclass-minus-peer difference. With ``--repeat N`` every model is fitted N times in a row and
each fit time is the median of its N: a fit of half a second is easily slowed by a passing
load on the machine.

    python benchmarks/peers.py --train feats/train --test feats/val --taxonomy category_names.csv \\
        --share 1 --share 0.1 --peer-python peer-venv/bin/python --out peers.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


# ---------------------------------------------------------------------------- peers (own interpreter)
def run_peers(train_dir: str, test_dir: str, tax_csv: str, c: float, out: str, repeat: int = 1) -> None:
    """Fit the two peers as the reference tool does (``repeat`` times each, timed) and save their test
    predictions (leaf ids) and fit seconds."""
    import pandas as pd
    from hiclass import LocalClassifierPerParentNode
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tax = pd.read_csv(tax_csv, dtype=str, keep_default_na=False)
    rows = tax.sort_values(["category_level1", "category_level2", "category_level3", "category_id"])
    paths = rows[["category_level1", "category_level2", "category_id"]].astype(str).values

    def load(d: str) -> tuple[np.ndarray, np.ndarray]:
        return np.load(f"{d}/features.npy", mmap_mode="r").astype(np.float32), np.load(f"{d}/images.npz")["leaf"]

    (x_train, l_train), (x_test, _) = load(train_dir), load(test_dir)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

    def paths_of(leaf: np.ndarray) -> np.ndarray:
        return np.array([[p[0], p[0] + "/" + p[1], p[2]] for p in paths[leaf]])

    y_train = paths_of(l_train)
    result: dict[str, Any] = {"sklearn_s": [], "hiclass_s": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        flat = LogisticRegression(C=c, max_iter=300).fit(x_train, y_train[:, 2])
        result["sklearn_s"].append(time.perf_counter() - t0)
    result["sklearn_pred"] = flat.predict(x_test).tolist()
    for _ in range(repeat):
        t0 = time.perf_counter()
        hier = LocalClassifierPerParentNode(local_classifier=LogisticRegression(C=c, max_iter=300), n_jobs=1)
        hier.fit(x_train, y_train)
        result["hiclass_s"].append(time.perf_counter() - t0)
    result["hiclass_pred"] = hier.predict(x_test)[:, 2].tolist()
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- hierclass
def subset_store(src: Any, rows: np.ndarray, root: Path) -> Any:
    """A new feature store holding ``rows`` of ``src`` (same metadata)."""
    from hierclass.featurestore import OK, FeatureStore

    meta = {k: v for k, v in src.meta.items() if k not in ("complete", "n_images", "dim", "views")}
    store = FeatureStore.create(
        root,
        dim=src.dim,
        product_id=src.product_id[rows],
        image_number=src.image_number[rows],
        leaf=src.leaf[rows],
        meta=meta,
    )
    feats = np.asarray(src.features()[rows])
    store.write(np.arange(len(rows)), {"orig": feats}, np.full(len(rows), OK, dtype=np.int8))
    store.mark_complete()
    return FeatureStore.open(root)


def run_hierclass(train: Any, test: Any, tax: Any, work: Path, repeat: int = 1) -> dict[str, Any]:
    """Train the three heads with default options (``repeat`` times each); the test predictions and fit seconds."""
    from hierclass.config import TrainConfig
    from hierclass.engine import train_head
    from hierclass.inference import FlatClassifier, HierarchicalClassifier, predict_store

    seconds: dict[str, list[float]] = {}
    choices = {}
    for _ in range(repeat):
        for kind in ("flat", "router", "experts"):
            m = train_head(kind, train, None, tax, TrainConfig(progress=False), work / kind, overwrite=True)
            # as the peers' fit(): training and its choices, not the scoring after
            seconds.setdefault(kind, []).append(m["fit_seconds"])
            choices[kind] = {k: m[k] for k in ("solver", "c", "best_epoch") if k in m}
    out: dict[str, Any] = {"fit_s": seconds, "choices": choices}
    for name, clf in (
        ("flat", FlatClassifier.from_run(work, tax)),
        ("hierarchical", HierarchicalClassifier.from_run(work, tax)),
    ):
        images, _ = predict_store(clf, test)
        order = np.argsort(images.ids, kind="stable")  # image rows: the order the peers predict in
        assert np.array_equal(images.ids[order], np.arange(test.n_images)), "every test row is predicted"
        out[f"{name}_pred"] = np.asarray(images.pred)[order]
        out["leaf"] = np.asarray(images.leaf)[order]
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` (per-sample 0/1 correctness) and its 95% paired-bootstrap interval."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n)])
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def catalogue(args: argparse.Namespace, share: float, tmp: Path) -> dict[str, Any]:
    from hierclass.data.splits import split_products
    from hierclass.featurestore import FeatureStore
    from hierclass.taxonomy import Taxonomy

    tax = Taxonomy.from_csv(args.taxonomy)
    full, test = FeatureStore.open(args.train), FeatureStore.open(args.test)
    keep = np.flatnonzero(full.valid & (full.leaf >= 0))
    if share < 1:
        _, picked = split_products(full.leaf[keep], val_fraction=share, seed=0)
        keep = keep[picked]
    train = subset_store(full, keep, tmp / f"train-{share:g}")
    test_keep = np.flatnonzero(test.valid & (test.leaf >= 0))
    test = subset_store(test, test_keep, tmp / "test") if len(test_keep) < test.n_images else test
    ours = run_hierclass(train, test, tax, tmp / f"run-{share:g}", args.repeat)
    peer_out = tmp / f"peers-{share:g}.json"
    subprocess.run(
        [args.peer_python, __file__, "--peer-only", str(train.root), str(test.root), args.taxonomy, str(args.c),
         str(peer_out), str(args.repeat)],
        check=True,
    )  # fmt: skip
    peers = json.loads(peer_out.read_text())
    leaf_ids = np.asarray([tax.rows[i].category_id for i in range(tax.n_leaves)])
    truth = leaf_ids[ours["leaf"]]
    right = {
        "hierclass flat": leaf_ids[ours["flat_pred"]] == truth,
        "hierclass hierarchical": leaf_ids[ours["hierarchical_pred"]] == truth,
        "scikit-learn LR": np.asarray(peers["sklearn_pred"]).astype(np.int64) == truth,
        "HiClass LCPPN": np.asarray(peers["hiclass_pred"]).astype(np.int64) == truth,
    }
    runs = {  # fit seconds of each repeat
        "hierclass flat": ours["fit_s"]["flat"],
        "hierclass hierarchical": [
            r + e for r, e in zip(ours["fit_s"]["router"], ours["fit_s"]["experts"], strict=True)
        ],
        "scikit-learn LR": peers["sklearn_s"],
        "HiClass LCPPN": peers["hiclass_s"],
    }
    fit = {k: float(np.median(v)) for k, v in runs.items()}
    pairs = {
        "flat - scikit-learn LR": ("hierclass flat", "scikit-learn LR"),
        "hierarchical - HiClass LCPPN": ("hierclass hierarchical", "HiClass LCPPN"),
    }
    return {
        "share": share,
        "n_train": len(keep),
        "n_test": len(truth),
        "accuracy": {k: float(v.mean()) for k, v in right.items()},
        "fit_s": {k: round(v, 2) for k, v in fit.items()},  # the median of the repeats
        "fit_s_runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "differences": {name: paired_bootstrap(right[a], right[b]) for name, (a, b) in pairs.items()},
        "speedup": {
            "scikit-learn LR / hierclass flat": fit["scikit-learn LR"] / fit["hierclass flat"],
            "HiClass LCPPN / hierclass hierarchical": fit["HiClass LCPPN"] / fit["hierclass hierarchical"],
        },
        "hierclass_choices": ours["choices"],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-only":
        train_dir, test_dir, tax_csv, c, out, repeat = sys.argv[2:8]
        run_peers(train_dir, test_dir, tax_csv, float(c), out, int(repeat))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="training feature store")
    ap.add_argument("--test", required=True, help="test feature store (scored, never trained or tuned on)")
    ap.add_argument("--taxonomy", required=True, help="category_names.csv")
    ap.add_argument("--share", type=float, action="append", help="stratified share of the training products (repeat)")
    ap.add_argument("--c", type=float, default=1.0, help="the peers' C")
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter with hiclass and scikit-learn")
    ap.add_argument("--repeat", type=int, default=1, help="fit every model this many times; fit seconds are medians")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for share in args.share or [1.0]:
            r = catalogue(args, share, Path(tmp))
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
