from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hierclass.featurestore import OK, FeatureStore
from hierclass.inference import (
    FlatClassifier,
    FusedClassifier,
    HierarchicalClassifier,
    Predictions,
    aggregate,
    fit_temperature,
    level_proba,
    predict_store,
    product_chunks,
    topk,
)
from hierclass.models.heads import ExpertHeads, FlatHead, RouterHead
from hierclass.taxonomy import Taxonomy

# Two branches, three leaves: A/a1/x (id 10), A/a2/y (id 11), B/b1/z (id 20).
TINY_ROWS = [(20, "B", "b1", "z"), (11, "A", "a2", "y"), (10, "A", "a1", "x")]


def tiny() -> Taxonomy:
    return Taxonomy.from_rows(TINY_ROWS)


def tree(n_branches: int = 4, seed: int = 0) -> Taxonomy:
    """A random taxonomy with branches of 1 to 6 leaves and 1 to 3 level-2 nodes each."""
    rng = np.random.default_rng(seed)
    rows, cid = [], 100
    for b in range(n_branches):
        for leaf in range(int(rng.integers(1, 7))):
            rows.append((cid, f"L1-{b}", f"L2-{b}-{leaf % 3}", f"leaf-{cid}"))
            cid += 1
    return Taxonomy.from_rows(rows)


class Columns(nn.Module):
    """A stand-in head whose logits are given feature columns (so tests choose the logits)."""

    def __init__(self, cols: list[int], taxonomy: Taxonomy | None = None) -> None:
        super().__init__()
        self.cols = cols
        self.taxonomy = taxonomy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.cols]

    def branch_logits(self, x: torch.Tensor, b: int) -> torch.Tensor:
        s, e = self.taxonomy.branch_start[b], self.taxonomy.branch_start[b + 1]
        return self.forward(x)[:, s:e]


def hand_model(combine: str = "soft", k: int = 3) -> HierarchicalClassifier:
    tax = tiny()
    return HierarchicalClassifier(Columns([0, 1]), Columns([2, 3, 4], tax), tax, combine=combine, k=k)


# router: P(A) = .7, P(B) = .3; expert A: P(x|A) = .2, P(y|A) = .8; expert B: P(z|B) = 1
HAND = np.log(np.array([[0.7, 0.3, 0.2, 0.8, 1.0]], dtype=np.float32))


def test_soft_combination_by_hand() -> None:
    clf = hand_model()
    assert clf.classes_.tolist() == [10, 11, 20]
    np.testing.assert_allclose(clf.predict_proba(HAND), [[0.14, 0.56, 0.30]], atol=1e-6)
    assert clf.predict(HAND).tolist() == [11]
    np.testing.assert_allclose(level_proba(clf.predict_proba(HAND), clf.taxonomy, 1), [[0.7, 0.3]], atol=1e-6)
    ids, p = clf.predict_topk(HAND, 2)
    assert ids.tolist() == [[11, 20]] and np.allclose(p, [[0.56, 0.30]])


def test_hard_and_topk_by_hand() -> None:
    np.testing.assert_allclose(hand_model("hard").predict_proba(HAND), [[0.2, 0.8, 0.0]], atol=1e-6)
    np.testing.assert_allclose(hand_model("topk", k=1).predict_proba(HAND), [[0.2, 0.8, 0.0]], atol=1e-6)
    np.testing.assert_allclose(hand_model("topk", k=2).predict_proba(HAND), [[0.14, 0.56, 0.30]], atol=1e-6)


def random_heads(tax: Taxonomy, dim: int = 8, hidden: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return RouterHead(dim, tax.n_level1, hidden), ExpertHeads(dim, tax, hidden), FlatHead(dim, tax.n_leaves, hidden)


@pytest.mark.parametrize("hidden", [None, 5])
def test_topk_with_all_branches_is_soft_and_levels_agree(hidden: int | None) -> None:
    tax = tree()
    router, experts, _ = random_heads(tax, hidden=hidden)
    x = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float16)
    soft = HierarchicalClassifier(router, experts, tax).predict_proba(x)
    np.testing.assert_allclose(soft.sum(1), 1, atol=1e-5)
    full = HierarchicalClassifier(router, experts, tax, combine="topk", k=tax.n_level1).predict_proba(x)
    np.testing.assert_allclose(full, soft, atol=1e-6)
    # soft: level-1 probabilities are exactly the router's
    clf = HierarchicalClassifier(router, experts, tax)
    np.testing.assert_allclose(level_proba(soft, tax, 1), clf.router_proba(x), atol=1e-6)
    l2 = level_proba(soft, tax, 2)
    assert l2.shape == (50, tax.n_level2)
    np.testing.assert_allclose(level_proba(l2_to_leaf_free(l2, tax), tax, 1), level_proba(soft, tax, 1), atol=1e-6)
    hard = HierarchicalClassifier(router, experts, tax, combine="hard").predict_proba(x)
    leaf_branch = tax.leaf_level1[hard.argmax(1)]
    assert (leaf_branch == clf.router_proba(x).argmax(1)).all()
    np.testing.assert_allclose(hard.sum(1), 1, atol=1e-5)
    top2 = HierarchicalClassifier(router, experts, tax, combine="topk", k=2).predict_proba(x)
    assert ((level_proba(top2, tax, 1) > 0).sum(1) <= 2).all()


def l2_to_leaf_free(l2: np.ndarray, tax: Taxonomy) -> np.ndarray:
    """Spread level-2 mass onto the first leaf of each level-2 node (to re-sum to level 1)."""
    out = np.zeros((len(l2), tax.n_leaves), dtype=l2.dtype)
    first = [int(np.flatnonzero(tax.leaf_level2 == j)[0]) for j in range(tax.n_level2)]
    out[:, first] = l2
    return out


@pytest.mark.parametrize("combine", ["soft", "topk", "hard"])
def test_batch_size_and_composition_do_not_matter(combine: str) -> None:
    tax = tree(5)
    router, experts, flat = random_heads(tax, hidden=6)
    x = np.random.default_rng(2).normal(size=(32, 8)).astype(np.float32)
    ref = HierarchicalClassifier(router, experts, tax, combine=combine, k=2, batch_size=1000).predict_proba(x)
    for bs in (1, 7):
        p = HierarchicalClassifier(router, experts, tax, combine=combine, k=2, batch_size=bs).predict_proba(x)
        np.testing.assert_allclose(p, ref, atol=1e-6)
    perm = np.random.default_rng(3).permutation(32)[:20]
    sub = HierarchicalClassifier(router, experts, tax, combine=combine, k=2, batch_size=8).predict_proba(x[perm])
    np.testing.assert_allclose(sub, ref[perm], atol=1e-6)
    f_ref = FlatClassifier(flat, tax).predict_proba(x)
    np.testing.assert_allclose(FlatClassifier(flat, tax, batch_size=5).predict_proba(x[perm]), f_ref[perm], atol=1e-6)


def test_flat_classifier_interface() -> None:
    tax = tiny()
    clf = FlatClassifier(Columns([0, 1, 2]), tax)
    x = np.log(np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], dtype=np.float32))
    np.testing.assert_allclose(clf.predict_proba(x), np.exp(x), atol=1e-6)
    assert clf.predict(x).tolist() == [20, 10]
    ids, p = clf.predict_topk(x, 5)  # k larger than the classes: all of them
    assert ids.tolist() == [[20, 11, 10], [10, 11, 20]] and p.shape == (2, 3)
    with pytest.raises(ValueError, match="2-D"):
        clf.predict_proba(np.zeros(3))
    with pytest.raises(ValueError, match="combine must be one of"):
        HierarchicalClassifier(Columns([0]), Columns([0]), tax, combine="best")  # type: ignore[arg-type]


def test_oracle_given_true_branch() -> None:
    clf = hand_model()
    p = clf.proba_given_branch(np.repeat(HAND, 2, axis=0), np.array([0, 1]))
    np.testing.assert_allclose(p, [[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]], atol=1e-6)


def test_aggregate_by_hand() -> None:
    p = np.array([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]], dtype=np.float32)
    ids, mean = aggregate(p, np.array([7, 3, 7]))
    assert ids.tolist() == [3, 7]
    np.testing.assert_allclose(mean, [[0.2, 0.8], [0.55, 0.45]], atol=1e-6)
    _, mx = aggregate(p, np.array([7, 3, 7]), "max")
    np.testing.assert_allclose(mx, [[0.2, 0.8], [0.6 / 1.1, 0.5 / 1.1]], atol=1e-6)
    _, geo = aggregate(p, np.array([7, 3, 7]), "logmean")
    g = np.sqrt([0.6 * 0.5, 0.4 * 0.5])
    np.testing.assert_allclose(geo[1], g / g.sum(), atol=1e-6)
    assert mean.dtype == np.float32
    with pytest.raises(ValueError, match="how must be one of"):
        aggregate(p, np.zeros(3), "median")  # type: ignore[arg-type]


def test_topk_ties_match_argmax() -> None:
    p = np.full((3, 6), 1 / 6)
    idx, _ = topk(p, 3)
    assert idx.tolist() == [[0, 1, 2]] * 3


def test_fit_temperature_recovers_the_truth() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(4000, 6))
    p = np.exp(z / 2.0)
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((4000, 1))).argmax(1)
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.1)
    # segments: labels in columns 0-2 normalise over 0-2 only, 3-5 over 3-5
    zs = z.copy()
    zs[:, 3:] += 50.0  # would swamp a full softmax; must not matter within segments
    pa, pb = np.exp(z[:, :3] / 0.5), np.exp(z[:, 3:] / 0.5)
    ya = (np.cumsum(pa / pa.sum(1, keepdims=True), 1) > rng.random((4000, 1))).argmax(1)
    yb = 3 + (np.cumsum(pb / pb.sum(1, keepdims=True), 1) > rng.random((4000, 1))).argmax(1)
    ys = np.where(np.arange(4000) % 2 == 0, ya, yb)
    assert fit_temperature(zs, ys, branch_start=np.array([0, 3, 6])) == pytest.approx(0.5, rel=0.1)


def test_calibrate_and_fuse() -> None:
    tax = tree(3)
    router, experts, _ = random_heads(tax)
    x = np.random.default_rng(4).normal(size=(300, 8)).astype(np.float32)
    noise = np.random.default_rng(5).integers(0, tax.n_leaves, 300)
    own = HierarchicalClassifier(router, experts, tax).predict_proba(x).argmax(1)
    y = np.where(np.arange(300) % 3 == 0, noise, own)  # labels the model mostly agrees with: T inside the bounds
    y[:5] = -1  # unlabelled rows are skipped
    hier = HierarchicalClassifier(router, experts, tax).calibrate(x, y)
    # the compact (true-branch expert only) fit equals the fit on every expert's logits, segment-wise
    with torch.no_grad():
        full = experts(torch.from_numpy(x[5:])).numpy()
        router_logits = router(torch.from_numpy(x[5:])).numpy()
    expected = fit_temperature(full, y[5:], branch_start=tax.branch_start)
    assert hier.expert_temperature == pytest.approx(expected, rel=1e-3)
    assert hier.router_temperature == pytest.approx(fit_temperature(router_logits, tax.leaf_level1[y[5:]]), rel=1e-3)
    sub = HierarchicalClassifier(router, experts, tax).calibrate(x, y, max_samples=50)
    assert 0.05 < hier.expert_temperature < 20 and sub.expert_temperature != hier.expert_temperature
    y[:5] = 0
    perfect = FlatClassifier(PerfectFlat(tax.n_leaves), tax)
    xy = np.concatenate([x, y[:, None].astype(np.float32)], axis=1)
    hier_xy = HierarchicalClassifier(DropLast(router), DropLast(experts), tax)
    fused = FusedClassifier(perfect, hier_xy, alpha=0.0)
    np.testing.assert_allclose(fused.predict_proba(xy), hier_xy.predict_proba(xy), atol=1e-5)
    fused.alpha = 1.0
    np.testing.assert_allclose(fused.predict_proba(xy), perfect.predict_proba(xy), atol=1e-5)
    assert fused.fit_alpha(xy, y).alpha == 1.0
    assert fused.fit_alpha(xy, y, objective="accuracy", grid=[0.0, 0.5, 1.0]).alpha == 0.5
    flat = FlatClassifier(PerfectFlat(tax.n_leaves), tax).calibrate(xy, y)
    assert flat.temperature == pytest.approx(0.05, rel=1e-3)  # the search bound: sharper is always better here


class PerfectFlat(nn.Module):
    """Reads the label from the last feature column: a flat model that is always right."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 5.0 * nn.functional.one_hot(x[:, -1].long(), self.n).float()


class DropLast(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, :-1])

    def branch_logits(self, x: torch.Tensor, b: int) -> torch.Tensor:
        return self.inner.branch_logits(x[:, :-1], b)


def make_store(path: Path, tax: Taxonomy, n_products: int = 40, dim: int = 8, seed: int = 0) -> FeatureStore:
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n_products)
    pid = np.repeat(rng.permutation(1000)[:n_products] + 5000, per)
    shuffle = rng.permutation(len(pid))  # images of a product are not contiguous
    pid = pid[shuffle]
    leaf_of_product = {p: int(rng.integers(0, tax.n_leaves)) for p in np.unique(pid)}
    leaf = np.array([leaf_of_product[p] for p in pid])
    store = FeatureStore.create(
        path,
        dim=dim,
        product_id=pid,
        image_number=np.zeros(len(pid), int),
        leaf=leaf,
        meta={"taxonomy_fingerprint": tax.fingerprint},
        views=("orig", "hflip"),
    )
    x = rng.normal(size=(len(pid), dim))
    status = np.full(len(pid), OK)
    status[3] = 2  # one bad image
    store.write(np.arange(len(pid)), {"orig": x, "hflip": -x}, status)
    store.mark_complete()
    return FeatureStore.open(path)


def test_product_chunks_keep_products_whole() -> None:
    pid = np.array([5, 1, 5, 2, 2, 2, 9, 1])
    for size in (1, 2, 3, 100):
        chunks = list(product_chunks(pid, np.arange(8), size))
        assert sorted(np.concatenate(chunks).tolist()) == list(range(8))
        seen = [set(pid[c].tolist()) for c in chunks]
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])


def test_predict_store_keeps_products_sharing_an_id_apart(tmp_path: Path) -> None:
    """Before: products were grouped by product_id, so two products of one _id became one."""
    tax = tree(4)
    pid, row = np.array([8, 8, 3, 8, 8]), np.array([0, 0, 1, 2, 2])  # _id 8: rows 0 and 2, other leaves
    store = FeatureStore.create(
        tmp_path / "f", dim=8, product_id=pid, image_number=np.array([0, 1, 0, 0, 1]), leaf=np.array([0, 0, 1, 2, 2]),
        meta={"taxonomy_fingerprint": tax.fingerprint}, product_row=row,
    )  # fmt: skip
    x = np.random.default_rng(0).normal(size=(5, 8))
    store.write(np.arange(5), {"orig": x}, np.full(5, OK))
    store.mark_complete()
    router, experts, _ = random_heads(tax)
    clf = HierarchicalClassifier(router, experts, tax)
    for size in (1, 100):
        _, prod = predict_store(clf, FeatureStore.open(tmp_path / "f"), chunk_images=size)
        assert (prod.ids.tolist(), prod.product_row.tolist(), prod.leaf.tolist()) == ([8, 3, 8], [0, 1, 2], [0, 1, 2])
        _, expected = aggregate(clf.predict_proba(store.features()[:]), row)
        np.testing.assert_allclose(prod.confidence, expected.max(1), atol=1e-6)


def test_predict_store_chunking_and_tta(tmp_path: Path) -> None:
    tax = tree(4)
    store = make_store(tmp_path / "f", tax)
    router, experts, _ = random_heads(tax)
    clf = HierarchicalClassifier(router, experts, tax)
    img, prod = predict_store(clf, store, chunk_images=100000, oracle=True)
    img5, prod5 = predict_store(clf, store, chunk_images=5, oracle=True)
    assert len(img) == store.valid.sum() and len(prod) == len(np.unique(store.product_id[store.valid]))
    order = np.argsort(img5.ids)
    np.testing.assert_allclose(img5.topk_prob[order], img.topk_prob[np.argsort(img.ids)], atol=1e-6)
    np.testing.assert_array_equal(prod5.ids, prod.ids)
    np.testing.assert_allclose(prod5.topk_prob, prod.topk_prob, atol=1e-6)
    assert (prod.ids == np.sort(prod.ids)).all()
    rows = img.ids
    direct = clf.predict_proba(store.features()[rows])
    np.testing.assert_allclose(img.confidence, direct.max(1), atol=1e-6)
    assert (img.leaf == store.leaf[rows]).all()
    assert (img.extra["router"] == clf.router_proba(store.features()[rows]).argmax(1)).all()
    ids, pp = aggregate(direct, store.product_id[rows])
    np.testing.assert_allclose(prod.confidence, pp.max(1), atol=1e-6)
    pred = Predictions.from_proba(pp, tax, ids)
    assert (pred.pred == prod.pred).all()
    img_tta, _ = predict_store(clf, store, tta=True)
    both = (direct + clf.predict_proba(store.features("hflip")[rows])) / 2
    np.testing.assert_allclose(img_tta.confidence, both.max(1), atol=1e-6)


# ---------------------------------------------------------------------------- experts with an other class
# Branches A = {a0, a1}, B = {b0, b1}. Router: P(A) = .6, P(B) = .4 (a routing mistake for a B image).
# Expert A over (a0, a1, other) = (.09, .01, .90): "not mine". Expert B over (b0, b1, other) = (.8, .1, .1).
OTHER_ROWS = [(1, "A", "a", "a0"), (2, "A", "a", "a1"), (3, "B", "b", "b0"), (4, "B", "b", "b1")]


def constant_heads(other: bool) -> tuple[Taxonomy, RouterHead, ExpertHeads]:
    """Heads whose outputs ignore the features (zero weights; the logits are the biases)."""
    tax = Taxonomy.from_rows(OTHER_ROWS)
    router, experts = RouterHead(3, 2), ExpertHeads(3, tax, other=other)
    with torch.no_grad():
        router.net[-1].weight.zero_()
        router.net[-1].bias.copy_(torch.log(torch.tensor([0.6, 0.4])))
        experts.linear.weight.zero_()
        experts.linear.bias.copy_(torch.log(torch.tensor([0.09, 0.01, 0.8, 0.1])))
        if other:
            experts.other_linear.weight.zero_()
            experts.other_linear.bias.copy_(torch.log(torch.tensor([0.9, 0.1])))
    return tax, router, experts


def test_other_combination_recovers_a_routing_mistake_by_hand() -> None:
    tax, router, experts = constant_heads(other=True)
    x = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    # scores .6 x (.09, .01) and .4 x (.8, .1) = (.054, .006, .32, .04), normalised by their sum .42
    expected = np.array([[0.054, 0.006, 0.32, 0.04]]) / 0.42
    for combine, k in (("soft", 3), ("topk", 2)):
        clf = HierarchicalClassifier(router, experts, tax, combine=combine, k=k)
        assert clf.expert_other
        np.testing.assert_allclose(clf.predict_proba(x), np.repeat(expected, 3, 0), atol=1e-6)
        assert clf.predict(x).tolist() == [3, 3, 3]  # b0: recovered
    # hard keeps the router's branch: the expert renormalised over its leaves (.9, .1)
    hard = HierarchicalClassifier(router, experts, tax, combine="hard").predict_proba(x)
    np.testing.assert_allclose(hard, np.repeat([[0.9, 0.1, 0.0, 0.0]], 3, 0), atol=1e-6)
    # top-1 of topk is hard; the oracle renormalises within the given branch
    top1 = HierarchicalClassifier(router, experts, tax, combine="topk", k=1).predict_proba(x)
    np.testing.assert_allclose(top1, hard, atol=1e-6)
    given = HierarchicalClassifier(router, experts, tax).proba_given_branch(x, np.array([1, 1, 0]))
    np.testing.assert_allclose(given, [[0, 0, 0.8 / 0.9, 0.1 / 0.9]] * 2 + [[0.9, 0.1, 0, 0]], atol=1e-6)
    # Without other, the same leaf logits give the naive two-stage answer: a0 (.6 x .9 = .54 > .4 x .89)
    tax, router, naive = constant_heads(other=False)
    assert HierarchicalClassifier(router, naive, tax).predict(x).tolist() == [1, 1, 1]


def test_other_combination_underflow_and_temperature() -> None:
    # Every expert sure it is "other" (P(leaf) ~ e^-200): the log-space combination still gives finite rows.
    tax, router, experts = constant_heads(other=True)
    with torch.no_grad():
        experts.other_linear.bias.fill_(200.0)
    x = np.zeros((2, 3), np.float32)
    for combine in ("soft", "topk", "hard"):
        p = HierarchicalClassifier(router, experts, tax, combine=combine, k=2).predict_proba(x)
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    # the expert temperature divides the other logit too
    tax, router, experts = constant_heads(other=True)
    clf = HierarchicalClassifier(router, experts, tax, expert_temperature=2.0)
    a = np.sqrt([0.09, 0.01, 0.9]) / np.sqrt([0.09, 0.01, 0.9]).sum()
    b = np.sqrt([0.8, 0.1, 0.1]) / np.sqrt([0.8, 0.1, 0.1]).sum()
    score = np.r_[0.6 * a[:2], 0.4 * b[:2]]
    np.testing.assert_allclose(clf.predict_proba(x), np.repeat([score / score.sum()], 2, 0), atol=1e-6)


@pytest.mark.parametrize("combine", ["soft", "topk", "hard"])
def test_other_combination_is_batch_independent_and_topk_all_is_soft(combine: str) -> None:
    tax = tree(5)
    torch.manual_seed(0)
    router, experts = RouterHead(8, tax.n_level1), ExpertHeads(8, tax, hidden=6, other=True)
    x = np.random.default_rng(2).normal(size=(32, 8)).astype(np.float32)
    ref = HierarchicalClassifier(router, experts, tax, combine=combine, k=2, batch_size=1000).predict_proba(x)
    np.testing.assert_allclose(ref.sum(1), 1, atol=1e-5)
    for bs in (1, 7):
        p = HierarchicalClassifier(router, experts, tax, combine=combine, k=2, batch_size=bs).predict_proba(x)
        np.testing.assert_allclose(p, ref, atol=1e-6)
    perm = np.random.default_rng(3).permutation(32)[:20]
    sub = HierarchicalClassifier(router, experts, tax, combine=combine, k=2, batch_size=8).predict_proba(x[perm])
    np.testing.assert_allclose(sub, ref[perm], atol=1e-6)
    soft = HierarchicalClassifier(router, experts, tax).predict_proba(x)
    full = HierarchicalClassifier(router, experts, tax, combine="topk", k=tax.n_level1).predict_proba(x)
    np.testing.assert_allclose(full, soft, atol=1e-6)


def test_calibrate_with_other_fits_leaves_and_other_of_the_true_branch() -> None:
    tax = tree(3)
    torch.manual_seed(0)
    router, experts = RouterHead(8, tax.n_level1), ExpertHeads(8, tax, other=True)
    x = np.random.default_rng(4).normal(size=(300, 8)).astype(np.float32)
    y = np.random.default_rng(5).integers(0, tax.n_leaves, 300)
    y[:5] = -1
    hier = HierarchicalClassifier(router, experts, tax).calibrate(x, y)
    with torch.no_grad():
        leaves, other = (t.numpy() for t in experts.all_logits(torch.from_numpy(x[5:])))
    groups = []
    for b in range(tax.n_level1):  # single-leaf branches included: leaf vs other
        rows = np.flatnonzero(tax.leaf_level1[y[5:]] == b)
        s, e = int(tax.branch_start[b]), int(tax.branch_start[b + 1])
        groups.append((np.c_[leaves[rows, s:e], other[rows, b]], tax.leaf_local[y[5:][rows]]))
    expected = fit_temperature(
        np.concatenate([np.pad(z, ((0, 0), (0, 8 - z.shape[1])), constant_values=-np.inf) for z, _ in groups]),
        np.concatenate([t for _, t in groups]),
    )
    assert hier.expert_temperature == pytest.approx(expected, rel=1e-3)


def test_ensemble_averages_members_reading_their_own_features(tmp_path: Path) -> None:
    from hierclass.inference import EnsembleClassifier, FeatureStores
    from hierclass.synthetic import write_synthetic_store

    tax = tree(3)
    narrow = write_synthetic_store(tmp_path / "narrow", tax, n=40, dim=6, seed=1)
    wide = write_synthetic_store(tmp_path / "wide", tax, n=40, dim=10, seed=1)
    torch.manual_seed(0)
    a = FlatClassifier(FlatHead(6, tax.n_leaves), tax)
    b = FlatClassifier(FlatHead(10, tax.n_leaves), tax, temperature=2.0)
    both = EnsembleClassifier([a, b])
    stores = FeatureStores([narrow, wide])
    images, products = predict_store(both, stores, k=tax.n_leaves)
    want = (a.predict_proba(narrow.features()) + b.predict_proba(wide.features())) / 2
    rows = images.ids
    got_rows = np.zeros((len(rows), tax.n_leaves), np.float32)
    np.put_along_axis(got_rows, images.topk_leaf, images.topk_prob, axis=1)
    np.testing.assert_allclose(got_rows, want[rows], atol=1e-6)
    assert len(products) == len(np.unique(narrow.product_id))
    other = write_synthetic_store(tmp_path / "other", tax, n=42, dim=6, seed=1)
    with pytest.raises(ValueError, match="hold different images"):
        FeatureStores([narrow, other])
    with pytest.raises(ValueError, match="at least 2 members"):
        EnsembleClassifier([a])
