from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hierclass.engine as engine
from hierclass.checkpoint import load_model
from hierclass.engine import Task, TrainConfig, class_weights, smoothed_nll, train_head
from hierclass.errors import CheckpointError
from hierclass.featurestore import OK, FeatureStore, FeatureStoreError
from hierclass.models.heads import ExpertHeads
from hierclass.synthetic import make_synthetic_features, synthetic_means, write_synthetic_store
from hierclass.taxonomy import Taxonomy

# 3 branches of 4, 3 and 1 (single-leaf) leaves.
ROWS = [(i, "A", f"a{i % 2}", f"x{i}") for i in range(4)] + [(10 + i, "B", "b", f"y{i}") for i in range(3)]
ROWS += [(20, "C", "c", "z")]
QUIET = {"progress": False}


@pytest.fixture
def tax() -> Taxonomy:
    return Taxonomy.from_rows(ROWS)


def tiny_store(root: Path, tax: Taxonomy, per_leaf: int = 3, dim: int = 16, meta: dict | None = None) -> FeatureStore:
    """Well-separated leaves, a few images each, plus an unlabelled and a bad row."""
    rng = np.random.default_rng(0)
    leaf = np.r_[np.repeat(np.arange(tax.n_leaves), per_leaf), -1, 0]
    feats, _ = make_synthetic_features(tax, len(leaf), dim, rng, noise=0.3, leaf=np.maximum(leaf, 0))
    store = FeatureStore.create(
        root,
        dim=dim,
        product_id=np.arange(len(leaf)),
        image_number=np.zeros(len(leaf)),
        leaf=leaf,
        meta={"taxonomy_fingerprint": tax.fingerprint, "backbone": "synthetic", **(meta or {})},
    )
    status = np.full(len(leaf), OK, dtype=np.int8)
    status[-1] = 2  # a bad image: never trained on
    store.write(np.arange(len(leaf)), {"orig": feats}, status)
    store.mark_complete()
    return FeatureStore.open(root)


OVERFIT = TrainConfig(
    solver="adamw", epochs=60, batch_size=8, lr=0.05, label_smoothing=0.0, weight_decay=0.0, patience=0, **QUIET
)


@pytest.mark.parametrize(("kind", "hidden"), [("router", None), ("flat", None), ("experts", None), ("experts", 8)])
def test_overfits_tiny_set(tmp_path: Path, tax: Taxonomy, kind: str, hidden: int | None) -> None:
    store = tiny_store(tmp_path / "f", tax)
    config = TrainConfig(**{**OVERFIT.__dict__, "hidden": hidden})
    m = train_head(kind, store, store, tax, config, tmp_path / "run" / kind)
    assert m["val_acc"] == 1.0 and m["train_loss"] < 0.05, m
    # Experts never see the single-leaf branch C; nobody sees the unlabelled or the bad row.
    assert m["n_train"] + m["n_holdout"] == (7 * 3 if kind == "experts" else 8 * 3) and m["n_holdout"] > 0
    log = [json.loads(line) for line in (tmp_path / "run" / kind / "log.jsonl").read_text().splitlines()]
    assert len(log) == 60 and {"epoch", "train_loss", "holdout_loss", "holdout_acc", "lr", "seconds"} <= set(log[0])
    model, meta = load_model(tmp_path / "run" / kind, tax)
    assert meta["metrics"]["best_epoch"] == m["best_epoch"] and meta["features"]["backbone"] == "synthetic"
    assert "n_images" not in meta["features"] and meta["training"]["hidden"] == hidden


def test_expert_predictions_map_to_global_leaves(tmp_path: Path, tax: Taxonomy) -> None:
    store = tiny_store(tmp_path / "f", tax)
    train_head("experts", store, store, tax, OVERFIT, tmp_path / "run")
    model, _ = load_model(tmp_path / "run", tax)
    labelled = np.flatnonzero(store.valid & (store.leaf >= 0))
    x = torch.from_numpy(np.asarray(store.features()[labelled], dtype=np.float32))
    leaf = store.leaf[labelled]
    for b in range(tax.n_level1):
        rows = tax.leaf_level1[leaf] == b
        local = model.branch_logits(x[rows], b).argmax(1).numpy()
        assert (tax.local_to_leaf(b, local) == leaf[rows]).all()
    log_probs = model.log_probs(x)
    assert (log_probs[:, tax.branch_start[2]] == 0).all()  # the single-leaf branch: P = 1


def test_task_samples_and_targets(tax: Taxonomy) -> None:
    leaf = np.array([0, 3, 4, 6, 7, -1])
    assert Task("router", tax).sample_mask(leaf).tolist() == [True] * 5 + [False]
    assert Task("experts", tax).sample_mask(leaf).tolist() == [True, True, True, True, False, False]
    assert Task("experts", tax, branch=1).sample_mask(leaf).tolist() == [False, False, True, True, False, False]
    assert Task("router", tax).targets(leaf[:5]).tolist() == [0, 0, 1, 1, 2]
    assert Task("flat", tax).targets(leaf[:5]).tolist() == [0, 3, 4, 6, 7]


def test_smoothed_nll_matches_cross_entropy_on_the_admissible_classes() -> None:
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 2, 1, 1])
    padded = torch.cat([logits, torch.full((4, 2), -torch.inf)], 1)
    got = smoothed_nll(torch.log_softmax(padded, 1), target, smoothing=0.2)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.2))
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    ref = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(smoothed_nll(torch.log_softmax(logits, 1), target, weight=w), (ref * w).sum() / w.sum())


def test_class_weights() -> None:
    w = class_weights(np.array([0, 0, 0, 0, 1, 3]), 4, power=0.5)
    assert w[2] == 0 and w[1] == pytest.approx(2 * w[0])
    assert (w[[0, 0, 0, 0, 1, 3]]).mean() == pytest.approx(1.0)


def test_deterministic_given_seed(tmp_path: Path, tax: Taxonomy) -> None:
    store = tiny_store(tmp_path / "f", tax)
    config = TrainConfig(epochs=3, batch_size=4, hidden=4, dropout=0.2, class_balance="sampler", **QUIET)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        config.seed = seed
        train_head("flat", store, None, tax, config, tmp_path / name)
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


@pytest.mark.parametrize("hidden", [None, 4])
def test_branch_retraining_changes_only_that_branch(tmp_path: Path, tax: Taxonomy, hidden: int | None) -> None:
    store = tiny_store(tmp_path / "f", tax)
    config = TrainConfig(epochs=2, batch_size=4, hidden=hidden, **QUIET)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="train all experts first"):
        train_head("experts", store, store, tax, config, run, branch="B")
    train_head("experts", store, store, tax, config, run)
    before, _ = load_model(run, tax)
    config.seed = 5
    m = train_head("experts", store, store, tax, config, run, branch="B")
    assert m["n_train"] + m["n_holdout"] == 3 * 3 and m["branch"] == "B"
    after, meta = load_model(run, tax)
    assert "B" in meta["branch_retrains"] and meta["metrics"]["branch"] is None
    x = torch.randn(5, 16)
    b = tax.branch_index("B")
    s, e = int(tax.branch_start[b]), int(tax.branch_start[b + 1])
    keep = np.r_[0:s, e : tax.n_leaves]
    torch.testing.assert_close(after(x)[:, keep], before(x)[:, keep], rtol=0, atol=0)
    assert not torch.allclose(after(x)[:, s:e], before(x)[:, s:e])
    with pytest.raises(CheckpointError, match="hidden"):
        train_head("experts", store, store, tax, TrainConfig(hidden=3, **QUIET), run, branch="B")


def test_refuses_mismatched_features(tmp_path: Path, tax: Taxonomy) -> None:
    store = tiny_store(tmp_path / "f", tax)
    other_tax = Taxonomy.from_rows([*ROWS, (99, "D", "d", "w")])
    with pytest.raises(FeatureStoreError, match="labelled with taxonomy"):
        train_head("flat", store, store, other_tax, TrainConfig(**QUIET), tmp_path / "run")
    other_backbone = tiny_store(tmp_path / "g", tax, meta={"backbone": "resnet50", "image_size": 224})
    with pytest.raises(FeatureStoreError, match="another backbone.*backbone, image_size"):
        train_head("router", store, other_backbone, tax, TrainConfig(**QUIET), tmp_path / "run")
    with pytest.raises(ValueError, match="class_balance"):
        train_head("router", store, store, tax, TrainConfig(class_balance="weird"), tmp_path / "run")


def test_early_stopping_keeps_best_epoch(tmp_path: Path, tax: Taxonomy, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tiny_store(tmp_path / "f", tax)
    accs = iter([0.5, 0.7, 0.6, 0.6, 0.9])
    real_score = engine.score
    monkeypatch.setattr(engine, "score", lambda *a: engine.Scores(1.0, np.array([next(accs) * 10]), np.array([10])))
    config = TrainConfig(solver="adamw", epochs=5, patience=2, **QUIET)
    m = train_head("router", store, None, tax, config, tmp_path / "run", echo=None)
    assert (m["best_epoch"], m["epochs_run"], m["stopped_early"]) == (2, 4, True)
    assert m["holdout_acc"] == 0.9  # the final scoring (the 5th call) comes after the best state is restored
    monkeypatch.setattr(engine, "score", real_score)


def test_class_balance_loss_runs(tmp_path: Path, tax: Taxonomy) -> None:
    store = tiny_store(tmp_path / "f", tax)
    m = train_head("experts", store, store, tax, TrainConfig(epochs=2, class_balance="loss", **QUIET), tmp_path / "r")
    assert np.isfinite(m["val_loss"])


def test_synthetic_features_are_hierarchical(tmp_path: Path) -> None:
    rows = [(i, f"L1-{i // 12}", f"L2-{i // 4}", f"leaf{i}") for i in range(36)]
    tax = Taxonomy.from_rows(rows)
    means = synthetic_means(tax, 64, np.random.default_rng(0))
    d = np.linalg.norm(means[:, None] - means[None], axis=-1)
    dist = tax.tree_distance(*np.meshgrid(np.arange(36), np.arange(36)))
    assert d[dist == 1].mean() < d[dist == 2].mean() < d[dist == 3].mean()
    feats, leaf = make_synthetic_features(tax, 100, 64, np.random.default_rng(1), means=means, imbalance=1.0)
    assert feats.shape == (100, 64) and feats.dtype == np.float32 and leaf.max() < 36
    store = write_synthetic_store(tmp_path / "s", tax, 1000, 8, seed=3, chunk=300)
    assert store.valid.all() and store.features().shape == (1000, 8) and store.meta["complete"]
    assert (store.leaf.reshape(-1, 2)[:, 0] == store.leaf.reshape(-1, 2)[:, 1]).all()
    weights = np.zeros(36)
    weights[[4, 30]] = [1.0, 3.0]
    store = write_synthetic_store(tmp_path / "w", tax, 400, 8, leaf_weights=weights, leaf_scale=0.0)
    assert set(store.leaf.tolist()) == {4, 30} and 0.6 < (store.leaf == 30).mean() < 0.9
    with pytest.raises(ValueError, match="leaf_weights"):
        write_synthetic_store(tmp_path / "bad", tax, 10, 8, leaf_weights=np.ones(3))


# ---------------------------------------------------------------------------- experts with an other class
def other_loss_loop(model, x: torch.Tensor, leaf: torch.Tensor, tax: Taxonomy, smoothing: float) -> torch.Tensor:
    """The definition: per sample, the sum over experts of each expert's cross-entropy over leaves + other."""
    total = torch.zeros(len(leaf))
    for b in range(tax.n_level1):
        z = model.branch_logits(x, b, include_other=True)
        in_b = torch.tensor(tax.leaf_level1)[leaf] == b
        target = torch.where(in_b, torch.tensor(tax.leaf_local)[leaf], z.shape[1] - 1)
        total += torch.nn.functional.cross_entropy(z, target, label_smoothing=smoothing, reduction="none")
    return total


@pytest.mark.parametrize("hidden", [None, 4])
def test_expert_other_loss_matches_its_definition(tax: Taxonomy, hidden: int | None) -> None:
    torch.manual_seed(0)
    model = ExpertHeads(6, tax, hidden=hidden, other=True).eval()
    x, leaf = torch.randn(9, 6), torch.tensor([0, 1, 3, 4, 5, 6, 7, 7, 2])
    task = Task("experts", tax, other=True)
    ref = other_loss_loop(model, x, leaf, tax, 0.1)
    torch.testing.assert_close(task.loss(model, x, leaf, 0.1), ref.mean())
    w = torch.rand(9)
    torch.testing.assert_close(task.loss(model, x, leaf, 0.1, w), (ref * w).sum() / w.sum())
    # One branch's retraining computes that expert's term only.
    b = tax.branch_index("B")
    z = model.branch_logits(x, b, include_other=True)
    target = torch.tensor([3, 3, 3, 0, 1, 2, 3, 3, 3])
    expected = torch.nn.functional.cross_entropy(z, target, label_smoothing=0.1)
    torch.testing.assert_close(Task("experts", tax, branch=b, other=True).loss(model, x, leaf, 0.1), expected)
    # Every labelled sample counts, single-leaf branch C included.
    assert Task("experts", tax, other=True).sample_mask(np.array([0, 7, -1])).tolist() == [True, True, False]
    assert Task("experts", tax, branch=1, other=True).sample_mask(np.array([0, 7, -1])).tolist() == [True, True, False]


@pytest.mark.parametrize("hidden", [None, 8])
def test_expert_other_overfits_and_learns_other(tmp_path: Path, tax: Taxonomy, hidden: int | None) -> None:
    store = tiny_store(tmp_path / "f", tax)
    config = TrainConfig(**{**OVERFIT.__dict__, "hidden": hidden, "expert_other": True})
    m = train_head("experts", store, store, tax, config, tmp_path / "run")
    assert m["val_acc"] == 1.0 and m["n_train"] + m["n_holdout"] == 8 * 3, m  # every labelled image, C's too
    model, meta = load_model(tmp_path / "run", tax)
    assert model.other and meta["head"]["other"] is True and meta["training"]["expert_other"] is True
    leaf = np.asarray(store.leaf)[:24]
    leaf_lp, other_lp = model.log_probs_with_other(torch.from_numpy(store.features()[:24].astype(np.float32)))
    p_other = other_lp.exp().detach().numpy()
    own = tax.leaf_level1[leaf]
    in_branch = np.arange(tax.n_level1)[None, :] == own[:, None]
    assert (p_other[~in_branch] > 0.9).all(), p_other  # other experts say "not mine"
    assert (p_other[in_branch] < 0.1).all(), p_other  # the own expert does not
    for i, y in enumerate(leaf):
        s, e = int(tax.branch_start[own[i]]), int(tax.branch_start[own[i] + 1])
        assert s + int(leaf_lp[i, s:e].argmax()) == y


@pytest.mark.parametrize("hidden", [None, 4])
def test_expert_other_branch_retraining(tmp_path: Path, tax: Taxonomy, hidden: int | None) -> None:
    store = tiny_store(tmp_path / "f", tax)
    config = TrainConfig(epochs=2, batch_size=4, hidden=hidden, expert_other=True, **QUIET)
    run = tmp_path / "run"
    train_head("experts", store, store, tax, config, run)
    before, _ = load_model(run, tax)
    config.seed = 5
    m = train_head("experts", store, store, tax, config, run, branch="B")
    assert m["n_train"] + m["n_holdout"] == 8 * 3 and m["branch"] == "B"  # it learns "other" from every image
    after, _ = load_model(run, tax)
    x = torch.randn(5, 16)
    b = tax.branch_index("B")
    s, e = int(tax.branch_start[b]), int(tax.branch_start[b + 1])
    keep = np.r_[0:s, e : tax.n_leaves]
    (leaves_a, other_a), (leaves_b, other_b) = after.all_logits(x), before.all_logits(x)
    torch.testing.assert_close(leaves_a[:, keep], leaves_b[:, keep], rtol=0, atol=0)
    others = [c for c in range(tax.n_level1) if c != b]
    torch.testing.assert_close(other_a[:, others], other_b[:, others], rtol=0, atol=0)
    assert not torch.allclose(leaves_a[:, s:e], leaves_b[:, s:e])
    assert not torch.allclose(other_a[:, b], other_b[:, b])
    # A single-leaf branch has something to learn with other (its leaf vs other).
    train_head("experts", store, store, tax, config, run, branch="C")
    with pytest.raises(CheckpointError, match="other class"):
        plain = TrainConfig(epochs=1, hidden=hidden, **QUIET)
        train_head("experts", store, store, tax, plain, run, branch="B")


# ---------------------------------------------------------------------------- the recipe
def noisy_store(root: Path, tax: Taxonomy, n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> FeatureStore:
    """An overlapping (not separable) problem: a convex solver's optimum is not trivial."""
    rng = np.random.default_rng(seed)
    means = synthetic_means(tax, 12, np.random.default_rng(0))
    feats, leaf = make_synthetic_features(tax, n, 12, rng, means=means, noise=2.5)
    store = FeatureStore.create(
        root,
        dim=12,
        product_id=np.arange(n),
        image_number=np.zeros(n),
        leaf=leaf,
        meta={"taxonomy_fingerprint": tax.fingerprint, "backbone": "synthetic"},
    )
    store.write(np.arange(n), {"orig": feats * scale + shift}, np.full(n, OK, dtype=np.int8))
    store.mark_complete()
    return FeatureStore.open(root)


def _probs(run: Path, tax: Taxonomy, store: FeatureStore) -> np.ndarray:
    model, _ = load_model(run, tax)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(np.asarray(store.features(), dtype=np.float32))), 1).numpy()


def test_linear_head_reaches_scikit_learns_optimum(tmp_path: Path, tax: Taxonomy) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    from hierclass.data.splits import holdout_mask

    train, test = noisy_store(tmp_path / "train", tax, 1500, 1), noisy_store(tmp_path / "test", tax, 1500, 2)
    config = TrainConfig(c=0.5, max_iter=500, tol=1e-8, **QUIET)
    m = train_head("flat", train, None, tax, config, tmp_path / "run")
    assert m["solver"] == "lbfgs" and m["c"] == 0.5
    fit = ~holdout_mask(train.product_id, train.leaf, config.holdout, config.seed)
    x, y = np.asarray(train.features(), dtype=np.float32)[fit], np.asarray(train.leaf)[fit]
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=0.5, max_iter=2000, tol=1e-8).fit(scaler.transform(x), y)
    x_test, y_test = np.asarray(test.features(), dtype=np.float32), np.asarray(test.leaf)
    ref_p = ref.predict_proba(scaler.transform(x_test))
    ours = _probs(tmp_path / "run", tax, test)[:, ref.classes_]
    ours /= ours.sum(1, keepdims=True)
    acc_ours, acc_ref = (
        (ref.classes_[ours.argmax(1)] == y_test).mean(),
        (ref.classes_[ref_p.argmax(1)] == y_test).mean(),
    )
    assert 0.3 < acc_ref < 0.95  # a problem with a non-trivial optimum
    assert abs(acc_ours - acc_ref) <= 0.005, (acc_ours, acc_ref)
    assert abs(log_loss(y_test, ours, labels=ref.classes_) - log_loss(y_test, ref_p, labels=ref.classes_)) < 2e-3


def test_standardisation_is_saved_and_applied_at_inference(tmp_path: Path, tax: Taxonomy) -> None:
    plain, scaled = noisy_store(tmp_path / "a", tax, 600, 1), noisy_store(tmp_path / "b", tax, 600, 1, 300.0, 40.0)
    config = TrainConfig(c=1.0, **QUIET)
    train_head("flat", plain, None, tax, config, tmp_path / "ra")
    train_head("flat", scaled, None, tax, config, tmp_path / "rb")
    state = load_file(tmp_path / "rb" / "model.safetensors")
    from hierclass.data.splits import holdout_mask

    fit = ~holdout_mask(scaled.product_id, scaled.leaf, config.holdout, config.seed)
    x = np.asarray(scaled.features(), dtype=np.float64)[fit]
    np.testing.assert_allclose(state["norm.mean"].numpy(), x.mean(0), rtol=1e-4)
    np.testing.assert_allclose(state["norm.std"].numpy(), x.std(0), rtol=1e-3)
    # The head trained on features x*300+40 takes raw x*300+40 at inference and agrees with the plain one.
    pa, pb = _probs(tmp_path / "ra", tax, plain), _probs(tmp_path / "rb", tax, scaled)
    assert (pa.argmax(1) == pb.argmax(1)).mean() > 0.99
    np.testing.assert_allclose(pa, pb, atol=0.02)
    # Without standardisation, a linear head on such features sees other numbers.
    train_head("flat", scaled, None, tax, TrainConfig(c=1.0, standardize=False, **QUIET), tmp_path / "rc")
    assert (load_file(tmp_path / "rc" / "model.safetensors")["norm.std"] == 1).all()


@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
def test_val_features_never_choose_anything(tmp_path: Path, tax: Taxonomy, solver: str) -> None:
    train = noisy_store(tmp_path / "train", tax, 600, 1)
    val_a, val_b = noisy_store(tmp_path / "va", tax, 200, 2), noisy_store(tmp_path / "vb", tax, 200, 3, 5.0, 9.0)
    config = TrainConfig(solver=solver, epochs=4, patience=1, c_grid=(0.01, 0.1, 1.0), **QUIET)
    ma = train_head("flat", train, val_a, tax, config, tmp_path / "ra")
    mb = train_head("flat", train, val_b, tax, config, tmp_path / "rb")
    a, b = load_file(tmp_path / "ra" / "model.safetensors"), load_file(tmp_path / "rb" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ma["holdout_acc"] == mb["holdout_acc"] and ma["val_acc"] != mb["val_acc"]
    assert ma["n_holdout"] > 0 and ma["n_train"] + ma["n_holdout"] == 600


def test_lbfgs_picks_c_per_expert_and_warns(tmp_path: Path, tax: Taxonomy) -> None:
    train = noisy_store(tmp_path / "train", tax, 800, 1)
    lines: list[str] = []
    m = train_head(
        "experts", train, None, tax, TrainConfig(c_grid=(1e-4, 1e-3), **QUIET), tmp_path / "r", echo=lines.append
    )
    experts = [name for name, size in zip(tax.level1_names, tax.branch_sizes, strict=True) if size > 1]
    assert set(m["c_per_branch"]) == set(experts) and m["c"] in (1e-4, 1e-3)  # a one-leaf branch has no expert
    for name in experts:  # each expert its own path: from the value nearest c_start, then the other way
        scouted = [line for line in lines if line.startswith(f"experts: expert {name!r}: C=") and "refined" not in line]
        assert [line.split()[3] for line in scouted] == [
            "C=0.001",
            "C=0.0001",
        ]
    assert any("weakest L2 strength tried (C=0.001) scored best" in line for line in lines)
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert {r["expert"] for r in log} == set(experts) and all("holdout_acc" in r for r in log)


def test_adamw_warns_while_still_improving(tmp_path: Path, tax: Taxonomy) -> None:
    train = noisy_store(tmp_path / "train", tax, 600, 1)
    lines: list[str] = []
    config = TrainConfig(solver="adamw", epochs=3, lr=1e-4, batch_size=64, **QUIET)
    m = train_head("router", train, None, tax, config, tmp_path / "r", echo=lines.append)
    assert m["best_epoch"] == 3 and any("still improving at the last epoch (3)" in line for line in lines)
    epochs = [line for line in lines if line.startswith("router: epoch ")]
    assert len(epochs) == 3 and all("train loss" in e and "holdout acc" in e and " lr " in e for e in epochs)


def test_auto_budget_scales_with_the_data() -> None:
    assert engine.auto_epochs(TrainConfig(), 2_000) == (300, 30)  # 4 steps an epoch: 750 wanted, capped at 300
    assert engine.auto_epochs(TrainConfig(), 100_000) == (16, 3)
    assert engine.auto_epochs(TrainConfig(), 12_000_000) == (10, 3)
    assert engine.auto_epochs(TrainConfig(epochs=4, patience=0), 2_000) == (4, 0)
    assert engine.resolve_solver(TrainConfig(), 2_000, 1280) == "lbfgs"
    assert engine.resolve_solver(TrainConfig(), 12_000_000, 1280) == "adamw"
    # the logits count too: 250k images fit as features, but not as 5,270 logits each
    assert engine.resolve_solver(TrainConfig(), 250_000, 1280, n_classes=49) == "lbfgs"
    assert engine.resolve_solver(TrainConfig(), 250_000, 1280, n_classes=5_270) == "adamw"
    assert engine.resolve_solver(TrainConfig(hidden=8), 2_000, 1280) == "adamw"
    with pytest.raises(ValueError, match="linear heads only"):
        engine.resolve_solver(TrainConfig(solver="lbfgs", hidden=8), 2_000, 1280)
