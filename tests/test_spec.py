from __future__ import annotations

from hierclass.checkpoint import backbone_config
from hierclass.spec import FeatureSpec

STORE_META = {
    "backbone": "efficientnet_lite0",
    "pretrained": "offline",
    "pretrained_sha256": "ab12",
    "data_config": {"input_size": [3, 128, 128], "interpolation": "bicubic", "crop_pct": 0.875, "mean": [0.5] * 3},
    "preprocess": 2,
    "engine": "onnx",
    "dim": 1280,
    "n_images": 10,  # about one extraction, not about what a feature means
    "source_path": "/data/train.bson",
}


def test_spec_reads_store_meta_and_names_what_differs() -> None:
    spec = FeatureSpec.from_meta(STORE_META)
    assert spec.backbone == "efficientnet_lite0" and spec.input_size == (3, 128, 128) and spec.image_size == 128
    assert spec.top_stages == 0 and spec.dim == 1280 and spec.mean == (0.5, 0.5, 0.5)
    assert "n_images" not in spec.identity() and "engine" not in spec.identity()
    torch_engine = FeatureSpec.from_meta({**STORE_META, "engine": "torch", "n_images": 99})
    assert spec.differences(torch_engine) == []  # both engines make the same features
    cut = FeatureSpec.from_meta({**STORE_META, "top_stages": 1, "map_shape": [192, 4, 4], "dim": 3072})
    assert spec.differences(cut) == ["dim", "map_shape", "top_stages"]
    smaller = FeatureSpec.from_meta(
        {**STORE_META, "data_config": {**STORE_META["data_config"], "input_size": [3, 96, 96]}}
    )
    assert spec.differences(smaller) == ["input_size"]
    assert "128 px" in spec.describe() and "pooled" in spec.describe() and "top 1 stage" in cut.describe()
    assert backbone_config(STORE_META) == spec.identity()
    legacy = FeatureSpec.from_meta({"backbone": "resnet50", "image_size": 224})
    assert legacy.differences(FeatureSpec.from_meta({"backbone": "resnet50", "image_size": 160})) == ["image_size"]
    assert FeatureSpec.from_meta(None).identity() == {}


def test_weights_are_known_by_their_fingerprint_so_a_run_can_move() -> None:
    spec = FeatureSpec.from_meta({**STORE_META, "pretrained": "runs/ft/flat/backbone.safetensors"})
    moved = FeatureSpec.from_meta({**STORE_META, "pretrained": "elsewhere/ft/flat/backbone.safetensors"})
    assert spec.differences(moved) == []
    retrained = FeatureSpec.from_meta({**moved.identity(), "pretrained_sha256": "cd34"})
    assert spec.differences(retrained) == ["pretrained_sha256"]
    unhashed = {k: v for k, v in STORE_META.items() if k != "pretrained_sha256"}
    a = FeatureSpec.from_meta({**unhashed, "pretrained": "a.safetensors"})
    assert a.differences(FeatureSpec.from_meta({**unhashed, "pretrained": "b.safetensors"})) == ["pretrained"]
