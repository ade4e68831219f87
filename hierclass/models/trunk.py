"""Cut a timm backbone at a stage boundary into a frozen *trunk* and a trainable *top*.

The stage list comes from the model's own structure: ``blocks`` (EfficientNet, MobileNet),
``layer1`` .. ``layer4`` (ResNet and its relatives) or ``stages`` (ConvNeXt and the like).
With ``top_stages = N`` the trunk is the stem plus every stage but the last N; it maps an
image to a feature map ``[C, H, W]``, which feature extraction stores once per image. The
top is the same timm model with its stem and lower stages replaced by identities, so calling
it on a trunk map runs the last N stages, the model's final conv / norm and its pooling,
exactly as the whole model would, and returns the pooled ``num_features`` vector.

Every cut is proven on two random images before use (:func:`checked_split`): the trunk must give a
map and the top on that map must reproduce the whole model. Other timm families whose forward pass
is also stem, stages, head pass that proof too (e.g. ByobNet, NFNet); models that do more (vision
transformers' position embeddings and class token) fail it and are refused with a one-line error
that names the supported families.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hierclass.errors import CheckpointError

FAMILIES = "EfficientNet / MobileNet (blocks), ResNet (layer1..layer4), ConvNeXt (stages)"


def stage_names(model: nn.Module) -> list[str]:
    """The names of the model's stages, in forward order (``blocks.0`` .., ``layer1`` .., ``stages.0`` ..).

    Raises:
        CheckpointError: the model is none of the supported families.
    """
    for container in ("blocks", "stages"):
        seq = getattr(model, container, None)
        if isinstance(seq, nn.Sequential) and len(seq) > 0:
            return [f"{container}.{i}" for i in range(len(seq))]
    layers = [f"layer{i}" for i in range(1, 5)]
    if all(isinstance(getattr(model, name, None), nn.Module) for name in layers):
        return layers
    raise CheckpointError(
        f"{type(model).__name__}: cannot cut this model into trunk and top stages; "
        f"--top-stages supports {FAMILIES} timm models (use --top-stages 0 for any other)"
    )


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if isinstance(owner, nn.Sequential):
        owner[int(child)] = module
    else:
        setattr(owner, child, module)


def _stem(model: nn.Module, first_stage: str) -> list[str]:
    """The model's direct children registered before its first stage: the stem, in forward order."""
    top_level = first_stage.split(".")[0]
    names = []
    for name, _ in model.named_children():
        if name == top_level:
            return names
        names.append(name)
    raise CheckpointError(f"{type(model).__name__}: no child {top_level!r}; cannot find its stem")


def check_cut(model: nn.Module, top_stages: int) -> list[str]:
    """The stage names, after checking that ``top_stages`` leaves at least one stage in the trunk."""
    names = stage_names(model)
    if not 0 <= top_stages < len(names):
        raise CheckpointError(
            f"--top-stages {top_stages}: {type(model).__name__} has {len(names)} stages; "
            f"give 0 (pooled features) to {len(names) - 1}"
        )
    return names


def split_model(model: nn.Module, top_stages: int) -> tuple[nn.Module, nn.Module]:
    """``(trunk, top)`` of a timm model built with ``num_classes=0``, cut before its last ``top_stages`` stages.

    ``top(trunk(x))`` equals ``model(x)``. Both are new modules (deep copies); ``model`` is not changed.

    Raises:
        CheckpointError: an unsupported family, or ``top_stages`` out of range (it must be >= 1 here).
    """
    names = check_cut(model, top_stages)
    if top_stages < 1:
        raise CheckpointError("split_model needs top_stages >= 1 (0 means the pooled features: no top)")
    lower, upper = names[:-top_stages], names[-top_stages:]
    stem = _stem(model, names[0])
    trunk = nn.Sequential(*(copy.deepcopy(_get(model, n)) for n in stem + lower))
    top = copy.deepcopy(model)
    for name in stem + lower:
        _set(top, name, nn.Identity())
    del upper
    return trunk.eval(), top.eval()


def map_shape(trunk: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """The ``[C, H, W]`` map the trunk gives for one image of ``input_size`` (``[3, H, W]``)."""
    with torch.no_grad():
        out = trunk(torch.zeros(1, *input_size))
    return tuple(int(d) for d in out.shape[1:])  # type: ignore[return-value]


def checked_split(
    model: nn.Module, top_stages: int, input_size: tuple[int, int, int], tolerance: float = 1e-4
) -> tuple[nn.Module, nn.Module, tuple[int, int, int]]:
    """:func:`split_model`, then proof on two random images that the cut is exact: the trunk gives a
    ``[C, H, W]`` map and ``top(trunk(x))`` equals ``model(x)``. Returns ``(trunk, top, map_shape)``.

    A model whose forward pass does more than its stem, stages and head (position embeddings, class
    tokens) fails the proof and is refused.

    Raises:
        CheckpointError: the model cannot be cut there.
    """
    trunk, top = split_model(model, top_stages)
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    error, maps = float("inf"), None
    try:
        with torch.no_grad():
            maps = trunk(x)
            if maps.ndim == 4:
                want = model.eval()(x)
                error = float((top(maps) - want).abs().max() / want.abs().max().clamp_min(1e-6))
    except Exception:  # noqa: BLE001 (any failure of the cut model is a model we cannot cut)
        error = float("inf")
    if error > tolerance or maps is None:
        raise CheckpointError(
            f"{type(model).__name__}: cutting before its last {top_stages} stage(s) does not reproduce the model "
            f"(its forward pass is not stem, stages, head); --top-stages supports {FAMILIES} timm models "
            "(use --top-stages 0 for any other)"
        )
    return trunk, top, tuple(int(d) for d in maps.shape[1:])  # type: ignore[return-value]
