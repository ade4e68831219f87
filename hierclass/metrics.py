"""Per-level and hierarchical metrics of leaf predictions.

Everything works on leaf indices (the taxonomy's order): ``y_true`` the true leaves,
``y_pred`` the predicted leaves. A level-1 or level-2 prediction is the ancestor of the
predicted leaf, so the three levels of one prediction are always one path of the tree and
``level1_acc >= level2_acc >= leaf_top1`` holds by construction.

* accuracy, top-k accuracy, macro-F1: scikit-learn's definitions;
* hierarchical precision / recall / F1 (Kiritchenko et al. 2006): each label is augmented
  with its ancestors (level 1, level 2, leaf; the root is left out), then
  ``hP = sum |P ∩ T| / sum |P|``, ``hR = sum |P ∩ T| / sum |T|``, ``hF = 2 hP hR / (hP + hR)``.
  A prediction that stops at level 1 or 2 (abstention) has a smaller set ``P``;
* mistake severity: the mean tree distance (1 same level-2, 2 same level-1, 3 other
  branch) between predicted and true leaf over the wrong predictions;
* expected calibration error over 15 equal-width confidence bins, and the reliability
  diagram's data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from hierclass.inference import Predictions
from hierclass.taxonomy import Taxonomy

N_BINS = 15
ABSTAIN_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _float(x: float) -> float | None:
    """A JSON-friendly float: None for nan (e.g. severity when nothing is wrong)."""
    return None if x is None or math.isnan(x) else float(x)


def ancestors(leaf: np.ndarray, taxonomy: Taxonomy, level: int) -> np.ndarray:
    """The level-1 or level-2 node index of each leaf (level 3: the leaf itself)."""
    leaf = np.asarray(leaf, dtype=np.int64)
    return {1: taxonomy.leaf_level1, 2: taxonomy.leaf_level2}[level][leaf] if level in (1, 2) else leaf


def level_accuracy(y_true: np.ndarray, y_pred: np.ndarray, taxonomy: Taxonomy, level: int) -> float:
    """Accuracy at level 1, 2 or 3 (leaf) of leaf predictions, comparing ancestors."""
    if len(y_true) == 0:
        return math.nan
    return float(accuracy_score(ancestors(y_true, taxonomy, level), ancestors(y_pred, taxonomy, level)))


def topk_accuracy(y_true: np.ndarray, topk_leaf: np.ndarray, k: int) -> float:
    """The fraction of samples whose true leaf is among their ``k`` first ranked leaves.

    Equals scikit-learn's ``top_k_accuracy_score`` on the full scores, but needs only the
    ranked leaves (``[N, >= k]``), so it works on predictions streamed in bounded memory.
    """
    if len(y_true) == 0:
        return math.nan
    return float((np.asarray(topk_leaf)[:, :k] == np.asarray(y_true)[:, None]).any(axis=1).mean())


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged F1 over the leaves present in ``y_true`` (scikit-learn's ``f1_score``).

    Leaves absent from the evaluation data are left out of the average (they have no
    recall); predicting them still costs the true leaf its recall.
    """
    if len(y_true) == 0:
        return math.nan
    return float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def hierarchical_prf(
    y_true: np.ndarray, y_pred: np.ndarray, taxonomy: Taxonomy, depth: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Set-based hierarchical precision, recall and F1 (Kiritchenko et al.).

    Args:
        y_true, y_pred: leaf indices.
        taxonomy: gives the ancestors.
        depth: how deep each prediction goes (1, 2 or 3; default 3): a prediction that
            abstains below level 2 keeps only its level-1 and level-2 ancestors.

    Returns:
        ``(hP, hR, hF)``.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        return math.nan, math.nan, math.nan
    depth = np.full(len(y_true), 3) if depth is None else np.asarray(depth)
    overlap = np.zeros(len(y_true))
    for level in (1, 2, 3):
        same = ancestors(y_true, taxonomy, level) == ancestors(y_pred, taxonomy, level)
        overlap += same & (depth >= level)
    hp = overlap.sum() / depth.sum()
    hr = overlap.sum() / (3.0 * len(y_true))
    hf = 0.0 if hp + hr == 0 else 2 * hp * hr / (hp + hr)
    return float(hp), float(hr), float(hf)


def mistake_severity(y_true: np.ndarray, y_pred: np.ndarray, taxonomy: Taxonomy) -> float:
    """Mean tree distance between predicted and true leaf over the errors (nan when none)."""
    wrong = np.asarray(y_true) != np.asarray(y_pred)
    if not wrong.any():
        return math.nan
    return float(taxonomy.tree_distance(np.asarray(y_true)[wrong], np.asarray(y_pred)[wrong]).mean())


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, Any]]:
    """The reliability diagram's data: per equal-width confidence bin ``(lo, hi]``, the count,
    the mean confidence and the accuracy (None for empty bins)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, correct, minlength=n_bins)
    return [
        {
            "lo": i / n_bins,
            "hi": (i + 1) / n_bins,
            "count": int(count[i]),
            "confidence": float(conf_sum[i] / count[i]) if count[i] else None,
            "accuracy": float(acc_sum[i] / count[i]) if count[i] else None,
        }
        for i in range(n_bins)
    ]


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE: the count-weighted mean of ``|accuracy - confidence|`` over equal-width bins."""
    n = len(confidence)
    if n == 0:
        return math.nan
    return float(
        sum(
            b["count"] / n * abs(b["accuracy"] - b["confidence"])
            for b in reliability(confidence, correct, n_bins)
            if b["count"]
        )
    )


def abstention_depth(preds: Predictions, threshold: float) -> np.ndarray:
    """How deep to answer each sample: the leaf (3) when its probability reaches ``threshold``,
    else its level-2 node (2) when that node's probability does, else level 1 only (1)."""
    return np.where(preds.confidence >= threshold, 3, np.where(preds.level2_prob >= threshold, 2, 1))


def coverage_table(
    preds: Predictions, taxonomy: Taxonomy, thresholds: Sequence[float] = ABSTAIN_THRESHOLDS
) -> list[dict[str, Any]]:
    """Accuracy against coverage when answering less deep below a confidence threshold.

    Per threshold: ``leaf_coverage`` (share answered down to the leaf), ``leaf_acc`` (leaf
    accuracy on those), ``level2_coverage`` (share answered to level 2 or deeper),
    ``answered_acc`` (share whose answer is right at the depth given), ``mean_depth`` and
    ``hierarchical_f1`` (with the shortened predictions). Only labelled samples count.
    """
    known = preds.leaf >= 0
    y, pred = preds.leaf[known], preds.pred[known]
    rows = []
    for t in thresholds:
        depth = abstention_depth(preds, t)[known]
        right = np.ones(len(y), dtype=bool)
        for level in (1, 2, 3):
            right &= (ancestors(y, taxonomy, level) == ancestors(pred, taxonomy, level)) | (depth < level)
        leaf_answered = depth == 3
        rows.append(
            {
                "threshold": float(t),
                "leaf_coverage": _float(leaf_answered.mean()) if len(y) else None,
                "leaf_acc": _float((y == pred)[leaf_answered].mean()) if leaf_answered.any() else None,
                "level2_coverage": _float((depth >= 2).mean()) if len(y) else None,
                "answered_acc": _float(right.mean()) if len(y) else None,
                "mean_depth": _float(depth.mean()) if len(y) else None,
                "hierarchical_f1": _float(hierarchical_prf(y, pred, taxonomy, depth)[2]),
            }
        )
    return rows


def per_branch_table(
    y_true: np.ndarray, y_pred: np.ndarray, taxonomy: Taxonomy, router_pred: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Per level-1 branch (by true leaf): images, leaves, leaf accuracy, level-1 accuracy
    (and the router's accuracy when ``router_pred`` branch indices are given)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    branch = taxonomy.leaf_level1[y_true]
    rows = []
    for b in range(taxonomy.n_level1):
        sel = branch == b
        n = int(sel.sum())
        row: dict[str, Any] = {
            "branch": b,
            "name": taxonomy.level1_names[b],
            "n_leaves": int(taxonomy.branch_sizes[b]),
            "n": n,
            "leaf_acc": _float((y_true[sel] == y_pred[sel]).mean()) if n else None,
            "level1_acc": _float((taxonomy.leaf_level1[y_pred[sel]] == b).mean()) if n else None,
        }
        if router_pred is not None:
            row["router_acc"] = _float((np.asarray(router_pred)[sel] == b).mean()) if n else None
        rows.append(row)
    return rows


def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, taxonomy: Taxonomy, top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` most frequent (true leaf, predicted leaf) errors, most frequent first.

    Each row: ``true`` and ``pred`` (leaf indices), their ``true_name`` / ``pred_name``
    (``level1 > level2 > leaf``), ``count``, ``share`` (of the true leaf's samples) and
    ``same_branch`` (whether both leaves are in one level-1 branch). Ties: by true, then predicted leaf.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    wrong = y_true != y_pred
    n = taxonomy.n_leaves
    pairs, counts = np.unique(y_true[wrong] * n + y_pred[wrong], return_counts=True)
    order = np.lexsort((pairs, -counts))[:top]
    per_true = np.bincount(y_true, minlength=n)
    rows = []
    for k in order:
        t, p = divmod(int(pairs[k]), n)
        rows.append(
            {
                "true": t,
                "pred": p,
                "true_name": " > ".join(taxonomy.leaf_path(t)),
                "pred_name": " > ".join(taxonomy.leaf_path(p)),
                "count": int(counts[k]),
                "share": float(counts[k] / per_true[t]),
                "same_branch": bool(taxonomy.leaf_level1[t] == taxonomy.leaf_level1[p]),
            }
        )
    return rows


def branch_confusion(y_true: np.ndarray, y_pred: np.ndarray, taxonomy: Taxonomy, branch: int) -> np.ndarray:
    """The confusion counts of one level-1 branch's samples (by true leaf).

    Returns:
        ``[size, size + 1]`` int64: rows the branch's true leaves (local order), columns the
        predicted leaf of the branch, and a last column for predictions in another branch.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    size = int(taxonomy.branch_sizes[branch])
    sel = taxonomy.leaf_level1[y_true] == branch
    t, p = taxonomy.leaf_local[y_true[sel]], y_pred[sel]
    col = np.where(taxonomy.leaf_level1[p] == branch, taxonomy.leaf_local[p], size)
    return np.bincount(t * (size + 1) + col, minlength=size * (size + 1)).reshape(size, size + 1)


def summarize(
    preds: Predictions, taxonomy: Taxonomy, n_bins: int = N_BINS, abstain_threshold: float | None = None
) -> dict[str, Any]:
    """Every metric of one model at one granularity (images or products), JSON-ready.

    Only samples with a known leaf (``leaf >= 0``) are scored. Keys: ``n``, ``leaf_top1``,
    ``leaf_top5``, ``level1_acc``, ``level2_acc``, ``macro_f1``, ``hierarchical_precision``,
    ``hierarchical_recall``, ``hierarchical_f1``, ``mistake_severity``, ``ece``; and
    ``router_acc`` / ``oracle_leaf_top1`` when ``preds.extra`` has ``router`` / ``oracle``;
    ``reliability`` (bins), ``per_branch`` (table), ``confused_pairs`` (the most frequent
    errors, :func:`confused_pairs`), ``abstention`` (coverage table; with
    ``abstain_threshold`` also ``abstain`` at that threshold).
    """
    known = preds.leaf >= 0
    y, pred = preds.leaf[known], preds.pred[known]
    correct = y == pred
    hp, hr, hf = hierarchical_prf(y, pred, taxonomy)
    out: dict[str, Any] = {
        "n": int(known.sum()),
        "leaf_top1": _float(level_accuracy(y, pred, taxonomy, 3)),
        "leaf_top5": _float(topk_accuracy(y, preds.topk_leaf[known], 5)),
        "level1_acc": _float(level_accuracy(y, pred, taxonomy, 1)),
        "level2_acc": _float(level_accuracy(y, pred, taxonomy, 2)),
        "macro_f1": _float(macro_f1(y, pred)),
        "hierarchical_precision": _float(hp),
        "hierarchical_recall": _float(hr),
        "hierarchical_f1": _float(hf),
        "mistake_severity": _float(mistake_severity(y, pred, taxonomy)),
        "ece": _float(expected_calibration_error(preds.confidence[known], correct, n_bins)),
    }
    if "router" in preds.extra:
        out["router_acc"] = _float((preds.extra["router"][known] == taxonomy.leaf_level1[y]).mean()) if len(y) else None
    if "oracle" in preds.extra:
        out["oracle_leaf_top1"] = _float((preds.extra["oracle"][known] == y).mean()) if len(y) else None
    out["reliability"] = reliability(preds.confidence[known], correct, n_bins)
    router = preds.extra["router"][known] if "router" in preds.extra else None
    out["per_branch"] = per_branch_table(y, pred, taxonomy, router)
    out["confused_pairs"] = confused_pairs(y, pred, taxonomy)
    thresholds = sorted({*ABSTAIN_THRESHOLDS, *([abstain_threshold] if abstain_threshold is not None else [])})
    out["abstention"] = coverage_table(preds, taxonomy, thresholds)
    if abstain_threshold is not None:
        out["abstain"] = next(r for r in out["abstention"] if r["threshold"] == float(abstain_threshold))
    return out


# ---------------------------------------------------------------------------- paired comparison
N_BOOTSTRAP = 10_000


def mcnemar_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``wins`` against ``losses`` at 1/2.

    ``wins`` and ``losses`` are the discordant pairs (one model right, the other wrong). The
    exact test is used whatever their number (the chi-square approximation is only a
    shortcut for large counts); 1.0 when there is no discordant pair.
    """
    n, k = int(wins) + int(losses), min(int(wins), int(losses))
    if n == 0:
        return 1.0
    # log C(n, i) - n log 2 for i = 0..k, built as a running sum (exact in log space, no overflow)
    i = np.arange(1, k + 1)
    log_pmf = np.concatenate([[0.0], np.cumsum(np.log((n - i + 1) / i))]) - n * math.log(2.0)
    return min(1.0, 2.0 * float(np.exp(log_pmf).sum()))


def paired_comparison(
    correct: np.ndarray, baseline_correct: np.ndarray, n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """Accuracy difference of a model against a baseline on the same samples, with its uncertainty.

    The 95% interval is the percentile interval of a paired bootstrap (samples drawn with
    replacement, both models kept together). Only the discordant samples move the
    difference, so a resample is drawn as multinomial counts of (wins, losses, ties): the
    same distribution as resampling the samples, at a cost independent of their number.

    Args:
        correct: whether the model is right, per sample.
        baseline_correct: whether the baseline is right on the same samples, in the same order.
        n_boot: bootstrap resamples.
        seed: the random seed (the same inputs and seed give the same interval).

    Returns:
        ``diff`` (accuracy minus the baseline's), ``ci_low``, ``ci_high``, ``mcnemar_p``,
        ``wins`` (model right, baseline wrong), ``losses``, ``n`` and ``verdict``:
        ``"better"`` / ``"worse"`` when the interval excludes 0, else ``"no clear difference"``.
    """
    a, b = np.asarray(correct, dtype=bool), np.asarray(baseline_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"correct has {a.shape} samples but baseline_correct has {b.shape}")
    n = len(a)
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    if n == 0:
        return {"diff": None, "ci_low": None, "ci_high": None, "mcnemar_p": None, "wins": 0, "losses": 0,
                "n": 0, "verdict": "no samples"}  # fmt: skip
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [wins / n, losses / n, (n - wins - losses) / n], size=n_boot)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
    return {
        "diff": float((wins - losses) / n),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "mcnemar_p": mcnemar_p(wins, losses),
        "wins": wins,
        "losses": losses,
        "n": n,
        "verdict": verdict,
    }
