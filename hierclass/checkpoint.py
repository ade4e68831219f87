"""Save and load trained heads: ``model.safetensors`` (weights, never pickled) + ``meta.json``.

A checkpoint directory describes itself: ``meta.json`` holds the head config (enough to
rebuild the module), the feature config it was trained on (backbone, preprocessing), the
taxonomy fingerprint and the class order, the training config and final metrics, and the
sha256 of the weights file, so a weights file from another save is caught. Both files are
written through a temporary file and a rename.

A save is one atomic step: the weights file also carries the whole metadata in its
safetensors header (with a sha256 of the tensors), and its rename is the moment the new
checkpoint replaces the old one. ``meta.json`` is written after it, as a readable copy. A
job killed between the two renames leaves new weights beside an old ``meta.json``; the
weights' own metadata is then used, so the folder holds the new checkpoint, whole, never a
mix of the two.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hierclass.atomic import atomic_path
from hierclass.errors import CheckpointError
from hierclass.featurestore import write_json_atomic
from hierclass.models.heads import build_head
from hierclass.taxonomy import Taxonomy

WEIGHTS, META = "model.safetensors", "meta.json"
HEADER_KEY = "hierclass_meta"  # the metadata's copy inside the safetensors header
CHECKPOINT_VERSION = 1

RUN_SPECIFIC_FEATURE_KEYS = frozenset(
    {
        *("n_images", "n_bad", "n_products", "complete", "views", "format_version", "last_run", "seconds"),
        *("source", "source_path", "source_size", "taxonomy_source", "dump", "data", "split", "source_problems"),
    }
)
"""Feature-store meta fields that describe one extraction run, not how features are made."""


def feature_config(store_meta: Mapping[str, Any]) -> dict[str, Any]:
    """A feature store's meta without its run-specific fields (what a checkpoint keeps)."""
    return {k: v for k, v in store_meta.items() if k not in RUN_SPECIFIC_FEATURE_KEYS}


def backbone_config(store_meta: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a meta that decide what a feature means (:meth:`hierclass.spec.FeatureSpec.identity`)."""
    from hierclass.spec import FeatureSpec

    return FeatureSpec.from_meta(store_meta).identity()


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


def _tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of the tensors' names, dtypes, shapes and bytes (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _embedded_meta(weights: Path) -> dict[str, Any] | None:
    """The metadata stored in the weights file's header, or None (an older save, or an unreadable header)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            text = (f.metadata() or {}).get(HEADER_KEY)
        meta = json.loads(text) if text else None
    except (SafetensorError, OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("head"), dict):
        return None
    return {**meta, "meta_from": WEIGHTS}  # meta.json is missing or stale: load_model checks the tensors' sha256


def save_model(out_dir: str | Path, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``out_dir/model.safetensors`` (weights and metadata) in one atomic step, then ``meta.json``.

    A kill at any moment leaves the previous checkpoint or the new one, whole.

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
    full = {
        **{k: v for k, v in meta.items() if k not in ("meta_from", "weights_sha256")},  # a loaded meta's own marks
        "head": model.config(),
        "hierclass_version": __version__,
        "checkpoint_version": CHECKPOINT_VERSION,
        "tensors_sha256": _tensors_sha256(tensors),
    }
    header = {"format": "pt", HEADER_KEY: json.dumps(full, sort_keys=True, ensure_ascii=False)}
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates it 0600; others of the group may load a run
        sha = _sha256(tmp)
    write_json_atomic(out_dir / META, {**full, "weights_sha256": sha})
    return out_dir


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory.

    Raises:
        CheckpointError: the file is missing or not valid JSON.
    """
    path = Path(out_dir) / META
    weights = Path(out_dir) / WEIGHTS
    embedded = _embedded_meta(weights) if weights.is_file() else None
    if not path.is_file():
        if embedded is not None:  # killed after the weights' rename, before meta.json's first write
            return embedded
        raise CheckpointError(f"{out_dir}: no checkpoint here ({META} missing); train one with `hierclass train-*`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        if embedded is not None:
            return embedded
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({e}); train the model again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("head"), dict):
        if embedded is not None:
            return embedded
        raise CheckpointError(f"{path}: not a hierclass checkpoint (no 'head' entry); train the model again")
    if embedded is not None and meta.get("weights_sha256") and _sha256(weights) != meta["weights_sha256"]:
        return embedded  # meta.json is from the save before: the weights' own metadata is the checkpoint's
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
    mismatch = CheckpointError(
        f"{weights}: contents do not match {META} (sha256 differs): a partial copy or another save; "
        "copy the whole directory again or retrain"
    )
    if meta.get("weights_sha256") and _sha256(weights) != meta["weights_sha256"]:
        raise mismatch
    from_header = meta.get("meta_from") == WEIGHTS
    try:
        model = build_head(meta["head"], taxonomy)
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        if from_header:
            raise mismatch from None
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # one line, however long torch's message is
        raise CheckpointError(f"{out_dir}: corrupt checkpoint ({reason}); train the model again") from None
    if meta.get("tensors_sha256") and _tensors_sha256(state) != meta["tensors_sha256"]:
        raise mismatch
    return model.to(torch.device(device)).eval(), meta
