"""Save and load trained heads: ``model.safetensors`` (weights, never pickled) + ``meta.json``.

A checkpoint directory describes itself: ``meta.json`` holds the head config (enough to
rebuild the module), the feature config it was trained on (backbone, preprocessing), the
taxonomy fingerprint and the class order, the training config and final metrics, and the
sha256 of the weights file, so a weights file from another save is caught. Both files are
written through a temporary file and a rename.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hierclass.atomic import atomic_path
from hierclass.errors import CheckpointError
from hierclass.featurestore import write_json_atomic
from hierclass.models.heads import build_head
from hierclass.taxonomy import Taxonomy

WEIGHTS, META = "model.safetensors", "meta.json"
CHECKPOINT_VERSION = 1

RUN_SPECIFIC_FEATURE_KEYS = frozenset(
    {
        *("n_images", "n_bad", "n_products", "complete", "views", "format_version", "last_run", "seconds"),
        *("source", "source_path", "source_size", "taxonomy_source", "dump", "data", "split", "source_problems"),
    }
)
"""Feature-store meta fields that describe one extraction run, not how features are made."""

BACKBONE_KEYS = frozenset(
    {
        "backbone",
        "model",
        "pretrained",
        "weights",
        "weights_sha256",
        "pretrained_sha256",
        "image_size",
        "input_size",
        "preprocess",
        "preprocessing",
        "data_config",
        "mean",
        "std",
        "interpolation",
        "crop_pct",
        "pool",
        "dim",
    }
)
"""Feature-store meta fields that decide what a feature vector means; heads refuse a mismatch."""


def feature_config(store_meta: Mapping[str, Any]) -> dict[str, Any]:
    """A feature store's meta without its run-specific fields (what a checkpoint keeps)."""
    return {k: v for k, v in store_meta.items() if k not in RUN_SPECIFIC_FEATURE_KEYS}


def backbone_config(store_meta: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a feature store's meta that decide what a feature means (backbone, preprocessing, dim)."""
    return {k: v for k, v in store_meta.items() if k in BACKBONE_KEYS or k.startswith("backbone")}


def class_order(kind: str, taxonomy: Taxonomy) -> list[Any]:
    """What each output column means: level-1 names for the router, leaf category_ids otherwise."""
    if kind == "router":
        return list(taxonomy.level1_names)
    return [int(c) for c in taxonomy.leaf_ids]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(out_dir: str | Path, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/meta.json``, each atomically.

    Args:
        out_dir: the checkpoint directory (created).
        model: a head with a ``config()`` method (RouterHead, FlatHead or ExpertHeads).
        meta: everything else to record (taxonomy, class_order, features, training, metrics);
            ``head``, ``hierclass_version``, ``checkpoint_version`` and ``weights_sha256`` are added.

    Returns:
        The checkpoint directory.
    """
    from hierclass import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        sha = _sha256(tmp)
    full = {
        **dict(meta),
        "head": model.config(),
        "hierclass_version": __version__,
        "checkpoint_version": CHECKPOINT_VERSION,
        "weights_sha256": sha,
    }
    write_json_atomic(out_dir / META, full)
    return out_dir


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory.

    Raises:
        CheckpointError: the file is missing or not valid JSON.
    """
    path = Path(out_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{out_dir}: no checkpoint here ({META} missing); train one with `hierclass train-*`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({e}); train the model again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("head"), dict):
        raise CheckpointError(f"{path}: not a hierclass checkpoint (no 'head' entry); train the model again")
    return meta


def load_model(out_dir: str | Path, taxonomy: Taxonomy, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a head from ``meta.json`` and load its weights (safetensors, no unpickling).

    Args:
        out_dir: a checkpoint directory written by :func:`save_model`.
        taxonomy: the taxonomy the caller uses; it must be the one the head was trained with.
        device: where to put the model.

    Returns:
        ``(model, meta)``, the model in eval mode.

    Raises:
        CheckpointError: missing or corrupt files, or a checkpoint made for another taxonomy or class order.
    """
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    saved_fp = (meta.get("taxonomy") or {}).get("fingerprint")
    if saved_fp != taxonomy.fingerprint:
        raise CheckpointError(
            f"{out_dir}: trained with taxonomy {saved_fp}, but {taxonomy.source} is {taxonomy.fingerprint}; "
            "pass the category_names.csv the model was trained with, or retrain on features of this taxonomy"
        )
    kind = meta["head"].get("kind")
    if meta.get("class_order") != class_order(str(kind), taxonomy):
        raise CheckpointError(
            f"{out_dir}: the {kind} head's class order differs from {taxonomy.source}'s "
            f"(fingerprints {saved_fp} and {taxonomy.fingerprint}); retrain the head with this taxonomy"
        )
    weights = out_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file missing; train the model again")
    if meta.get("weights_sha256") and _sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights}: contents do not match {META} (sha256 differs): a partial copy or another save; "
            "copy the whole directory again or retrain"
        )
    try:
        model = build_head(meta["head"], taxonomy)
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # one line, however long torch's message is
        raise CheckpointError(f"{out_dir}: corrupt checkpoint ({reason}); train the model again") from None
    return model.to(torch.device(device)).eval(), meta
