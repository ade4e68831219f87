from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, top_k_accuracy_score

from hierclass.inference import Predictions
from hierclass.metrics import (
    abstention_depth,
    coverage_table,
    expected_calibration_error,
    hierarchical_prf,
    level_accuracy,
    macro_f1,
    mistake_severity,
    per_branch_table,
    reliability,
    summarize,
    topk_accuracy,
)
from hierclass.taxonomy import Taxonomy

# Leaf order: 0 A/a1/x, 1 A/a1/w, 2 A/a2/y, 3 B/b1/z
ROWS = [(1, "A", "a1", "x"), (2, "A", "a1", "w"), (3, "A", "a2", "y"), (4, "B", "b1", "z")]


@pytest.fixture
def tax() -> Taxonomy:
    t = Taxonomy.from_rows(ROWS)
    assert [t.leaf_path(i) for i in range(4)] == [
        ("A", "a1", "w"),
        ("A", "a1", "x"),
        ("A", "a2", "y"),
        ("B", "b1", "z"),
    ]
    return t


def test_against_scikit_learn(tax: Taxonomy) -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((200, 4))
    scores /= scores.sum(1, keepdims=True)
    y = rng.integers(0, 4, 200)
    preds = Predictions.from_proba(scores, tax, np.arange(200), y, k=5)
    for k in (1, 2, 3):
        assert topk_accuracy(y, preds.topk_leaf, k) == pytest.approx(
            top_k_accuracy_score(y, scores, k=k, labels=np.arange(4))
        )
    assert macro_f1(y, preds.pred) == pytest.approx(f1_score(y, scores.argmax(1), average="macro"))
    # a leaf never true is left out of the macro average
    assert macro_f1(np.array([0, 0]), np.array([0, 3])) == pytest.approx(2 / 3)


def test_hand_computed(tax: Taxonomy) -> None:
    y = np.array([0, 0, 0, 0, 3])
    p = np.array([0, 1, 2, 3, 3])  # right, same level-2, same level-1, other branch, right
    assert level_accuracy(y, p, tax, 3) == pytest.approx(2 / 5)
    assert level_accuracy(y, p, tax, 2) == pytest.approx(3 / 5)
    assert level_accuracy(y, p, tax, 1) == pytest.approx(4 / 5)
    assert tax.tree_distance(y, p).tolist() == [0, 1, 2, 3, 0]
    assert mistake_severity(y, p, tax) == pytest.approx((1 + 2 + 3) / 3)
    assert math.isnan(mistake_severity(y, y, tax))
    # overlaps of the ancestor-augmented sets: 3, 2, 1, 0, 3 of 3 each
    hp, hr, hf = hierarchical_prf(y, p, tax)
    assert hp == hr == hf == pytest.approx(9 / 15)
    # predictions cut to level 1 (sample 2) and level 2 (sample 1): |P| = 3+2+1+3+3
    hp, hr, hf = hierarchical_prf(y, p, tax, depth=np.array([3, 2, 1, 3, 3]))
    # the cut levels were the wrong ones, so the overlap stays 9: precision rises, recall stays
    assert hp == pytest.approx(9 / 12) and hr == pytest.approx(9 / 15)
    assert hf == pytest.approx(2 * (9 / 12) * (9 / 15) / (9 / 12 + 9 / 15))


def test_ece_and_reliability_by_hand() -> None:
    conf = np.array([0.95, 0.95, 0.05, 0.5])
    correct = np.array([1, 0, 0, 1])
    bins = reliability(conf, correct, n_bins=10)
    assert [b["count"] for b in bins] == [1, 0, 0, 0, 1, 0, 0, 0, 0, 2]  # 0.5 is in (0.4, 0.5]
    assert bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.95)
    assert bins[1]["accuracy"] is None
    expected = (2 * abs(0.5 - 0.95) + abs(0 - 0.05) + abs(1 - 0.5)) / 4
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(expected)
    assert len(reliability(conf, correct)) == 15


def test_per_branch_and_abstention(tax: Taxonomy) -> None:
    y = np.array([0, 0, 2, 3])
    p = np.array([0, 1, 3, 3])
    table = per_branch_table(y, p, tax, router_pred=np.array([0, 0, 0, 1]))
    assert table[0] == {"branch": 0, "name": "A", "n_leaves": 3, "n": 3, "leaf_acc": 1 / 3, "level1_acc": 2 / 3,
                        "router_acc": 1.0}  # fmt: skip
    assert table[1]["leaf_acc"] == 1.0 and table[1]["n"] == 1
    proba = np.array([[0.9, 0.05, 0.05, 0.0], [0.3, 0.4, 0.3, 0.0], [0.2, 0.2, 0.2, 0.4], [0.0, 0.0, 0.0, 1.0]])
    preds = Predictions.from_proba(proba, tax, np.arange(4), y)
    assert preds.pred.tolist() == [0, 1, 3, 3]
    assert preds.level2_prob.tolist() == pytest.approx([0.95, 0.7, 0.4, 1.0])
    assert preds.level1_prob.tolist() == pytest.approx([1.0, 1.0, 0.4, 1.0])
    assert abstention_depth(preds, 0.5).tolist() == [3, 2, 1, 3]
    rows = {r["threshold"]: r for r in coverage_table(preds, tax, [0.0, 0.5, 1.0])}
    assert rows[0.0]["leaf_coverage"] == 1.0 and rows[0.0]["answered_acc"] == 0.5
    assert rows[0.5]["leaf_coverage"] == 0.5 and rows[0.5]["leaf_acc"] == 1.0
    assert rows[0.5]["answered_acc"] == 0.75  # sample 2 answered "B" at level 1 is still wrong
    assert rows[1.0]["leaf_acc"] == 1.0 and rows[1.0]["mean_depth"] == pytest.approx(1.5)


def test_summarize_consistency(tax: Taxonomy) -> None:
    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(4) * 0.5, size=300)
    y = rng.integers(0, 4, 300)
    y[:10] = -1  # unlabelled rows are not scored
    preds = Predictions.from_proba(proba, tax, np.arange(300), y)
    preds.extra = {"router": tax.leaf_level1[proba.argmax(1)], "oracle": np.where(y >= 0, y, 0)}
    s = summarize(preds, tax, abstain_threshold=0.42)
    assert s["n"] == 290
    assert s["leaf_top5"] >= s["leaf_top1"] and s["level2_acc"] >= s["leaf_top1"]
    assert s["level1_acc"] >= s["level2_acc"] and s["oracle_leaf_top1"] == 1.0
    assert 0 <= s["ece"] <= 1 and 1 <= s["mistake_severity"] <= 3
    assert s["abstain"]["threshold"] == 0.42 and len(s["per_branch"]) == 2
    assert sum(b["count"] for b in s["reliability"]) == 290
    assert sum(r["n"] for r in s["per_branch"]) == 290


def test_mcnemar_exact_against_hand_computed() -> None:
    from hierclass.metrics import mcnemar_p

    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_p(10, 3) == pytest.approx(2 * (1 + 13 + 78 + 286) / 2**13)
    assert mcnemar_p(7, 7) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(500, 560) == pytest.approx(0.0699096, rel=1e-5)  # scipy.stats.binomtest(500, 1060)


def test_paired_comparison_matches_resampling_the_samples() -> None:
    from hierclass.metrics import paired_comparison

    rng = np.random.default_rng(3)
    flat = rng.random(1500) < 0.75
    model = np.where(rng.random(1500) < 0.15, ~flat, flat)  # disagrees on ~15% of the samples
    out = paired_comparison(model, flat, seed=0)
    assert out == paired_comparison(model, flat, seed=0)  # deterministic
    assert out["diff"] == pytest.approx(model.mean() - flat.mean())
    assert out["wins"] == int((model & ~flat).sum()) and out["n"] == 1500
    # the reference: resample the samples themselves, both models together
    idx = np.random.default_rng(1).integers(0, 1500, size=(4000, 1500))
    ref = np.quantile(model[idx].mean(axis=1) - flat[idx].mean(axis=1), [0.025, 0.975])
    assert out["ci_low"] == pytest.approx(ref[0], abs=0.003) and out["ci_high"] == pytest.approx(ref[1], abs=0.003)
    assert out["ci_low"] < out["diff"] < out["ci_high"]
    sign = "worse" if out["ci_high"] < 0 else "better" if out["ci_low"] > 0 else "no clear difference"
    assert out["verdict"] == sign
    better = paired_comparison(flat | (rng.random(1500) < 0.2), flat)
    assert better["verdict"] == "better" and better["ci_low"] > 0 and better["mcnemar_p"] < 1e-6
    assert paired_comparison(flat, flat | (rng.random(1500) < 0.2))["verdict"] == "worse"
    with pytest.raises(ValueError, match="samples"):
        paired_comparison(flat, flat[:10])


def test_confused_pairs_and_branch_confusion_by_hand() -> None:
    from hierclass.metrics import branch_confusion, confused_pairs

    tax = Taxonomy.from_rows([(1, "A", "a", "x"), (2, "A", "a", "y"), (3, "A", "b", "w"), (4, "B", "b", "z")])
    y = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    p = np.array([1, 1, 3, 1, 0, 2, 3, 0])
    pairs = confused_pairs(y, p, tax)
    assert [(r["true"], r["pred"], r["count"]) for r in pairs] == [(0, 1, 2), (0, 3, 1), (1, 0, 1), (3, 0, 1)]
    assert pairs[0]["share"] == pytest.approx(2 / 3) and pairs[0]["same_branch"] and not pairs[1]["same_branch"]
    assert pairs[0]["true_name"] == "A > a > x" and pairs[0]["pred_name"] == "A > a > y"
    assert len(confused_pairs(y, p, tax, top=2)) == 2 and confused_pairs(y, y, tax) == []
    # branch A (leaves x, y, w): rows true leaf, columns predicted leaf of A, last column another branch
    np.testing.assert_array_equal(branch_confusion(y, p, tax, 0), [[0, 2, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(branch_confusion(y, p, tax, 1), [[1, 1]])
