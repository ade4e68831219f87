"""What a feature means: the one description shared by feature stores, checkpoints and runs.

A feature row is only meaningful to a head trained on rows made the same way: the same
backbone and weights, the same preprocessing (input size, crop, interpolation, mean, std), the
same cut (``top_stages``: 0 is the pooled vector, N the trunk's map below the top N stages)
and so the same width. :class:`FeatureSpec` gathers these fields from the metadata that feature
stores and checkpoints record, and compares two of them field by field, so an error can name
exactly what differs.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Older metadata spelled some settings at the top level; they still take part in the comparison.
_LEGACY_KEYS = (
    "model",
    "weights",
    "weights_sha256",
    "image_size",
    "preprocessing",
    "pool",
)


def _frozen(value: Any) -> Any:
    """A hashable copy of a JSON value (lists become tuples, dicts sorted item tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class FeatureSpec:
    """How the features a model reads were made.

    Attributes:
        backbone: the timm model name.
        pretrained: where its weights came from (a name, a file, ``none``).
        pretrained_sha256: a fingerprint of those weights, when recorded. Where it is, it
            identifies the weights and ``pretrained`` is not compared, so a run or a
            checkpoint file can move.
        input_size: ``(channels, height, width)`` fed to the backbone.
        interpolation, crop_pct, crop_mode, mean, std: the rest of timm's data config.
        preprocess: the version of hierclass's decode-and-resize path.
        top_stages: 0 for the pooled vector; N for the trunk's map under the top N stages.
        map_shape: ``(C, H, W)`` of that map (None for pooled vectors).
        dim: the width of one stored row.
        engine: what ran the backbone (``onnx`` or ``torch``); both give the same features,
            so it is recorded but not compared.
        legacy: settings recorded by older versions under other names (compared as they are).
    """

    backbone: str | None = None
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    input_size: tuple[int, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    preprocess: Any = None
    top_stages: int = 0
    map_shape: tuple[int, ...] | None = None
    dim: int | None = None
    engine: str | None = None
    legacy: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> FeatureSpec:
        """The spec recorded in a feature store's ``meta.json`` or a checkpoint's ``meta["features"]``."""
        meta = meta or {}
        config = meta.get("data_config") or {}

        def pick(key: str) -> Any:
            return _frozen(config.get(key, meta.get(key)))

        legacy = tuple((k, _frozen(meta[k])) for k in sorted(meta) if k in _LEGACY_KEYS or (k.startswith("backbone_")))
        dim = meta.get("dim")
        return cls(
            backbone=meta.get("backbone"),
            pretrained=None if meta.get("pretrained") is None else str(meta["pretrained"]),
            pretrained_sha256=meta.get("pretrained_sha256"),
            input_size=pick("input_size"),
            interpolation=pick("interpolation"),
            crop_pct=pick("crop_pct"),
            crop_mode=pick("crop_mode"),
            mean=pick("mean"),
            std=pick("std"),
            preprocess=_frozen(meta.get("preprocess")),
            top_stages=int(meta.get("top_stages") or 0),
            map_shape=_frozen(meta.get("map_shape")),
            dim=None if dim is None else int(dim),
            engine=meta.get("engine"),
            legacy=legacy,
        )

    def identity(self) -> dict[str, Any]:
        """The recorded fields that decide what a feature means (``engine`` and unrecorded ones left out)."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("engine", "legacy") and getattr(self, f.name) is not None
        }
        if not self.top_stages:
            out.pop("top_stages")
        if self.pretrained_sha256 is not None:
            out.pop("pretrained", None)
        out.update(self.legacy)
        return out

    def differences(self, other: FeatureSpec) -> list[str]:
        """The names of the fields on which ``self`` and ``other`` disagree (either side may lack one)."""
        a, b = self.identity(), other.identity()
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))

    @property
    def image_size(self) -> int | None:
        """The side of the square input, when recorded."""
        return int(self.input_size[-1]) if self.input_size else None

    def describe(self) -> str:
        """One line for people: backbone, input size and cut."""
        cut = f"top {self.top_stages} stage(s) trainable" if self.top_stages else "pooled features"
        size = f"{self.image_size} px" if self.image_size else "size not recorded"
        return f"{self.backbone or 'unknown backbone'} ({self.pretrained or 'weights not recorded'}), {size}, {cut}"
