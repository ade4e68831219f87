"""CNN tops on cached trunk maps: the cut, the map stores, the models, their training and refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hierclass.checkpoint import load_model
from hierclass.cli import app
from hierclass.data.synthetic import make_synthetic_catalogue
from hierclass.engine import Task, TrainConfig, train_head
from hierclass.errors import CheckpointError
from hierclass.features import FeatureExtractor, extract_features
from hierclass.featurestore import FeatureStore, FeatureStoreError
from hierclass.models.backbone import create_backbone
from hierclass.models.tops import ExpertTops, TopHead, make_top
from hierclass.models.trunk import checked_split, split_model, stage_names
from hierclass.taxonomy import Taxonomy

runner = CliRunner()
FAMILIES = ["test_efficientnet", "mobilenetv3_small_050", "test_resnet", "test_convnext"]
BACKBONE, SIZE = "test_efficientnet", 64


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("top_stages", [1, 2])
def test_untouched_top_on_the_trunk_map_gives_the_models_logits(name: str, top_stages: int) -> None:
    model = create_backbone(name, "none", keep_classifier=True)  # random init, with the 1000-class classifier
    trunk, top = split_model(model, top_stages)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, maps = model(x), trunk(x)
        got = top(maps)
    assert maps.ndim == 4 and want.shape == (3, 1000)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    n_trunk, n_top = (sum(p.numel() for p in m.parameters()) for m in (trunk, top))
    assert n_trunk + n_top == sum(p.numel() for p in model.parameters())  # every weight on exactly one side


def test_stage_lists_come_from_the_model() -> None:
    assert stage_names(create_backbone("test_resnet", "none")) == ["layer1", "layer2", "layer3", "layer4"]
    assert stage_names(create_backbone("test_convnext", "none"))[0] == "stages.0"
    assert stage_names(create_backbone("tf_efficientnet_lite0", "none")) == [f"blocks.{i}" for i in range(7)]


def test_other_models_and_bad_cuts_are_refused_in_one_line() -> None:
    vit = create_backbone("test_vit", "none")
    with pytest.raises(CheckpointError, match="supports EfficientNet / MobileNet .*ResNet .*ConvNeXt") as e:
        checked_split(vit, 1, (3, 160, 160))
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="--top-stages 5: EfficientNet has 5 stages; give 0"):
        split_model(create_backbone("test_efficientnet", "none"), 5)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return make_synthetic_catalogue(tmp_path_factory.mktemp("cat"), n_train=80, n_val=30)


@pytest.fixture(scope="module")
def stores(catalogue, tmp_path_factory: pytest.TempPathFactory) -> dict[str, FeatureStore]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("stores")
    tax = Taxonomy.from_csv(catalogue.taxonomy)
    common = {"image_size": SIZE, "progress": False}
    return {
        "pooled": extract_features(catalogue.train, tax, BACKBONE, "none", root / "pooled", engine="torch", **common),
        "maps": extract_features(
            catalogue.train, tax, BACKBONE, "none", root / "maps", top_stages=1, hflip=True, **common
        ),
        "val": extract_features(catalogue.val, tax, BACKBONE, "none", root / "val", top_stages=1, **common),
        "cut2": extract_features(catalogue.val, tax, BACKBONE, "none", root / "cut2", top_stages=2, **common),
    }


def test_map_store_holds_the_trunk_map(stores: dict[str, FeatureStore]) -> None:
    maps, pooled = stores["maps"], stores["pooled"]
    shape = maps.meta["map_shape"]
    assert maps.meta["top_stages"] == 1 and maps.dim == int(np.prod(shape)) and maps.meta["views"] == ["orig", "hflip"]
    assert "top_stages" not in pooled.meta  # pooled stores (and the heads trained on them) are as before
    assert maps.features().dtype == np.float16 and maps.valid.all()
    # The top on the stored (float16) maps reproduces the pooled features of the whole model (onnx trunk).
    top = make_top(BACKBONE, "none", 1).eval()
    x = torch.from_numpy(np.asarray(maps.features()[:16], dtype=np.float32)).reshape(-1, *shape)
    with torch.no_grad():
        got = top(x).numpy()
    want = np.asarray(pooled.features()[:16], dtype=np.float32)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()  # float16 storage of maps and of features


def test_extractor_gives_flattened_maps_and_resume_refuses_another_cut(
    stores: dict[str, FeatureStore], catalogue, tmp_path: Path
) -> None:  # noqa: ANN001
    extractor = FeatureExtractor(BACKBONE, "none", engine="torch", image_size=SIZE, top_stages=1)
    assert extractor.map_shape == tuple(stores["maps"].meta["map_shape"]) and extractor.dim == stores["maps"].dim
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    assert extractor(images).shape == (2, extractor.dim)
    tax = Taxonomy.from_csv(catalogue.taxonomy)
    with pytest.raises(FeatureStoreError, match="top_stages 1 -> 2"):
        extract_features(catalogue.val, tax, BACKBONE, "none", stores["val"].root, image_size=SIZE, top_stages=2)


def test_experts_see_only_their_branch(stores: dict[str, FeatureStore], catalogue) -> None:  # noqa: ANN001
    tax = Taxonomy.from_csv(catalogue.taxonomy)
    store = stores["maps"]
    spec = {k: store.meta[k] for k in ("backbone", "top_stages", "map_shape", "num_features")}
    experts = ExpertTops(tax, spec, make_top(BACKBONE, "none", 1))
    big = [b for b in range(tax.n_level1) if tax.branch_sizes[b] > 1]
    assert sorted(int(k) for k in experts.tops) == big  # a single-leaf branch has no expert
    b = big[0]
    leaf = np.asarray(store.leaf)
    rows = np.flatnonzero(tax.leaf_level1[np.maximum(leaf, 0)] == b)[:8]
    x = torch.from_numpy(np.asarray(store.features()[rows], dtype=np.float32))
    Task("experts", tax).loss(experts, x, torch.from_numpy(leaf[rows])).backward()
    for key in experts.tops:
        grads = [p.grad for p in [*experts.tops[key].parameters(), *experts.classifiers[key].parameters()]]
        touched = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
        assert touched == (int(key) == b), key


def test_tops_train_save_load_and_score(stores: dict[str, FeatureStore], catalogue, tmp_path: Path) -> None:  # noqa: ANN001
    tax = Taxonomy.from_csv(catalogue.taxonomy)
    config = TrainConfig(epochs=2, batch_size=32, progress=False)
    run = tmp_path / "run"
    m = train_head("flat", stores["maps"], stores["val"], tax, config, run / "flat")
    assert m["solver"] == "adamw" and 0 <= m["val_acc"] <= 1
    flat, meta = load_model(run / "flat", tax)
    assert isinstance(flat, TopHead) and meta["training"]["flip_used"] and meta["training"]["batch_size"] == 32
    x = torch.from_numpy(np.asarray(stores["val"].features()[:5], dtype=np.float32))
    again, _ = load_model(run / "flat", tax)
    with torch.no_grad():
        assert torch.equal(flat(x), again(x))  # a checkpoint round trip gives the same model
    # Experts from the flat top (HD-CNN): before training, each expert is the flat top on its branch's leaves.
    experts = Task("experts", tax).build_model(stores["maps"].dim, config, stores["maps"].meta)
    experts.init_from_flat_(flat)
    with torch.no_grad():
        leaf_logits, flat_logits = experts.eval()(x), flat(x)
    for key in experts.tops:
        b = int(key)
        cols = slice(tax.branch_start[b], tax.branch_start[b + 1])
        assert torch.allclose(leaf_logits[:, cols], flat_logits[:, cols], atol=1e-5)
    cfg = TrainConfig(epochs=1, batch_size=32, progress=False, init_from="flat")
    train_head("experts", stores["maps"], None, tax, cfg, run / "experts")
    before, _ = load_model(run / "experts", tax)
    name = tax.level1_names[int(next(iter(before.tops)))]
    train_head("experts", stores["maps"], None, tax, TrainConfig(epochs=1, batch_size=16, progress=False, seed=3),
               run / "experts", branch=name)  # fmt: skip
    after, meta = load_model(run / "experts", tax)
    for key in before.tops:  # only the retrained branch's expert changed
        same = all(
            torch.equal(p, q) for p, q in zip(before.tops[key].parameters(), after.tops[key].parameters(), strict=True)
        )
        assert same == (tax.level1_names[int(key)] != name), key
    assert name in meta["branch_retrains"]


def test_cli_trains_tops_and_refuses_a_wrong_cut(stores: dict[str, FeatureStore], catalogue, tmp_path: Path) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    for kind in ("flat", "router", "experts"):
        args = [f"train-{kind}", "--train", str(stores["maps"].root), "--run", str(run), "--epochs", "1"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "AdamW" in result.stdout
    out = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--data", str(catalogue.val), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["flat"]["n_images"] == stores["val"].n_images  # the maps were extracted with the run's cut
    (cache,) = (run / "features").iterdir()
    assert json.loads((cache / "meta.json").read_text())["top_stages"] == 1
    result = runner.invoke(
        app, ["evaluate", "--run", str(run), "--features", str(stores["cut2"].root), "--out", str(out)]
    )
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "wide" in line and str(stores["cut2"].root) in line  # another cut gives maps of another width
    args = ["train-flat", "--train", str(stores["maps"].root), "--run", str(tmp_path / "r2"), "--solver", "lbfgs"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "lbfgs" in result.stderr and "CNN tops" in result.stderr


def test_killed_training_resumes_to_the_same_weights(
    stores: dict[str, FeatureStore], catalogue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    from hierclass import engine

    tax = Taxonomy.from_csv(catalogue.taxonomy)
    config = TrainConfig(epochs=3, patience=0, batch_size=32, dropout=0.2, progress=False)
    whole = train_head("flat", stores["maps"], None, tax, config, tmp_path / "whole")
    assert not (tmp_path / "whole" / engine.RESUME_FILE).exists()

    real_score, calls = engine.score, []

    def killed_in_epoch_2(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill after epoch 1's state was saved
        return real_score(*args, **kwargs)

    monkeypatch.setattr(engine, "score", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_head("flat", stores["maps"], None, tax, config, tmp_path / "killed")
    assert (tmp_path / "killed" / engine.RESUME_FILE).is_file() and not (tmp_path / "killed" / "meta.json").exists()
    monkeypatch.setattr(engine, "score", real_score)
    lines: list[str] = []
    again = train_head("flat", stores["maps"], None, tax, config, tmp_path / "killed", echo=lines.append)
    assert any("resuming from epoch 1/3" in line for line in lines)
    assert again["best_epoch"] == whole["best_epoch"] and again["holdout_acc"] == whole["holdout_acc"]
    a, _ = load_model(tmp_path / "whole", tax)
    b, _ = load_model(tmp_path / "killed", tax)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not (tmp_path / "killed" / engine.RESUME_FILE).exists()
