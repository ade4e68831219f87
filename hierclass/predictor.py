"""Predictions on plain images (files or bytes) with a run's models: what ``predict`` on image files and
``serve`` share.

An image goes the way it went when the run's features were extracted: decoded by
:func:`~hierclass.data.decode_image`, resized and cropped by the run's
:class:`~hierclass.data.EvalTransform` (built from its :class:`~hierclass.spec.FeatureSpec`), through the
backbone, and rounded to float16 as the feature cache stores it, so a photo gets the same answer here as
in ``hierclass predict`` on a dump holding it. The backbone's ONNX export is kept in the run
(``RUN/onnx/<backbone>-<size>px-<key>.onnx``, the key hashing what the export depends on) and reused by
every later start.

An image that does not decode is never given a leaf: its prediction is empty and says why.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hierclass.errors import DumpError, HierclassError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from hierclass.features import FeatureExtractor
    from hierclass.run import Run
    from hierclass.spec import FeatureSpec
    from hierclass.taxonomy import Taxonomy

ImageInput = str | Path | bytes | bytearray | memoryview
"""One image: a file path, or its encoded bytes."""

ONNX_DIR = "onnx"
NOT_AN_IMAGE = "not a decodable image (JPEG, PNG, WebP, BMP, GIF or TIFF), or a damaged or truncated one"
DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")  # must equal the run's


@dataclass(frozen=True)
class RankedLeaf:
    """One leaf of a ranked answer.

    Attributes:
        category_id: the leaf's category_id.
        path: its ``(level1, level2, leaf)`` names.
        probability: its probability.
    """

    category_id: int
    path: tuple[str, str, str]
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"category_id": self.category_id, "path": list(self.path), "probability": self.probability}


@dataclass(frozen=True)
class ImagePrediction:
    """The answer for one image, or for one product (several images of the same thing).

    Attributes:
        sources: the image of each input (its path, or ``image N`` for bytes), in order.
        leaves: the most probable leaves, best first; empty when no image decoded.
        level1: ``(name, probability)`` of every level-1 branch, most probable first; empty likewise.
        n_decoded: how many of the images decoded (the others are left out of the answer).
        depth: with an abstention threshold, how deep the answer goes: 3 (the leaf), 2 or 1.
        reason: why there is no answer (None when there is one).
        problems: one line per image that did not decode.
    """

    sources: tuple[str, ...]
    leaves: tuple[RankedLeaf, ...] = ()
    level1: tuple[tuple[str, float], ...] = ()
    n_decoded: int = 0
    depth: int | None = None
    reason: str | None = None
    problems: tuple[str, ...] = field(default=())

    @property
    def category_id(self) -> int | None:
        """The top-1 leaf's category_id (None without an answer)."""
        return self.leaves[0].category_id if self.leaves else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``predictions`` (category_id, path, probability), ``level1`` (name,
        probability), and ``depth``, ``reason``, ``problems`` when they apply."""
        out: dict[str, Any] = {
            "predictions": [leaf.to_dict() for leaf in self.leaves],
            "level1": [{"name": name, "probability": p} for name, p in self.level1],
            "images": len(self.sources),
            "decoded": self.n_decoded,
        }
        if self.depth is not None:
            out["depth"] = self.depth
        if self.reason is not None:
            out["reason"] = self.reason
        if self.problems:
            out["problems"] = list(self.problems)
        return out


def onnx_cache_path(run_root: str | Path, spec: FeatureSpec) -> Path:
    """Where a run keeps the ONNX export of its backbone: ``RUN/onnx/<backbone>-<size>px-<key>.onnx``.

    The key hashes what the export depends on (backbone, weights, input size, normalisation, cut), so a
    run's folder can hold the exports of several settings and a start never re-exports a matching one.
    """
    what = {k: v for k, v in spec.identity().items() if k in ("backbone", "pretrained", "pretrained_sha256",
            "input_size", "mean", "std", "top_stages")}  # fmt: skip
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = (spec.backbone or "backbone").replace("/", "_")
    return Path(run_root) / ONNX_DIR / f"{name}-{spec.image_size or 'native'}px-{key}.onnx"


def build_extractor(run: Run, engine: str = "onnx") -> FeatureExtractor:
    """The backbone that made the features ``run``'s heads read, with its preprocessing.

    Raises:
        HierclassError: the run records no backbone, or the rebuilt preprocessing differs from the recorded one.
    """
    from hierclass.features import FeatureExtractor
    from hierclass.spec import FeatureSpec

    spec = run.spec
    if not spec.backbone:
        raise HierclassError(
            f"{run.root}: its checkpoints do not record the backbone their features came from; "
            "retrain the run on features made by extract-features"
        )
    extractor = FeatureExtractor(
        spec.backbone,
        spec.pretrained or "none",
        engine=engine,
        image_size=spec.image_size,
        onnx_path=onnx_cache_path(run.root, spec) if engine == "onnx" else None,
        crop_pct=spec.crop_pct,
        top_stages=spec.top_stages,
    )
    rebuilt = FeatureSpec.from_meta({"data_config": extractor.data_config})
    differ = [k for k in DATA_KEYS if getattr(spec, k) is not None and getattr(spec, k) != getattr(rebuilt, k)]
    if differ:
        shown = ", ".join(f"{k}={getattr(rebuilt, k)!r} vs {getattr(spec, k)!r}" for k in differ)
        raise HierclassError(
            f"{run.root}: the preprocessing rebuilt for {spec.backbone} differs from the one its features were made "
            f"with ({shown}); use the hierclass and timm versions the run was trained with"
        )
    if extractor.dim != spec.dim and spec.dim is not None:
        raise HierclassError(
            f"{run.root}: {spec.backbone} gives {extractor.dim}-wide features but the heads take {spec.dim}; "
            "retrain the run, or use the backbone it was trained on"
        )
    return extractor


class ImagePredictor:
    """A run's model on decoded images: decode, preprocess, backbone, heads, ranked leaves.

    Build it with :meth:`Run.image_predictor`, which builds the backbone once per run.

    Args:
        run: a loaded run (its ``models`` are read at each call, so a calibration applied later counts).
        extractor: the run's backbone (:func:`build_extractor`).
        model: which of ``run.models`` answers (default ``hierarchical``, else the only one there is).
        batch_size: images per backbone pass when predicting many files.
    """

    def __init__(self, run: Run, extractor: FeatureExtractor, model: str | None = None, batch_size: int = 32) -> None:
        if model is None:
            model = "hierarchical" if "hierarchical" in run.models else next(iter(run.models))
        if model not in run.models:
            raise HierclassError(f"{run.root}: has no {model} model; pick one of {', '.join(run.models)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.run = run
        self.model = model
        self.extractor = extractor
        self.transform = extractor.transform()
        self.batch_size = batch_size

    @property
    def taxonomy(self) -> Taxonomy:
        """The taxonomy of the run's heads."""
        assert self.run.taxonomy is not None, "a loaded run has its taxonomy"
        return self.run.taxonomy

    def decode(self, data: bytes) -> torch.Tensor | None:
        """One image's pixels (uint8 ``[3, H, W]``, at the size the resize needs), or None if it does not decode."""
        from hierclass.data import decode_image, to_uint8_tensor

        if not data:
            return None
        pixels = decode_image(bytes(data), self.transform.draft_size)
        return None if pixels is None else to_uint8_tensor(pixels)

    def proba(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """Leaf probabilities ``[N, n_leaves]`` of decoded images (one backbone pass per ``batch_size``)."""
        import numpy as np

        if not images:
            return np.zeros((0, self.taxonomy.n_leaves), np.float32)
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = self.transform.batch(images[start : start + self.batch_size])
            # float16, as the feature cache stores them: the same answers as predict on a dump
            features = self.extractor(batch).astype(np.float16).astype(np.float32)
            parts.append(self.run.models[self.model].predict_proba(features))
        return np.concatenate(parts)

    def predict_decoded(
        self,
        products: Sequence[Sequence[torch.Tensor | None]],
        sources: Sequence[Sequence[str]],
        *,
        topk: int = 5,
        abstain_threshold: float | None = None,
        why: Sequence[Sequence[str | None]] | None = None,
        proba: np.ndarray | None = None,
    ) -> list[ImagePrediction]:
        """Answers for products given as decoded images (None: did not decode), one per product.

        A product's images are combined as ``predict`` combines them (the mean of their probabilities).

        Args:
            products: the decoded images of each product.
            sources: the name of each image (its path, or ``image N``).
            topk: leaves ranked per answer.
            abstain_threshold: below this probability the answer stops at level 2 or 1 (``depth``).
            why: for each image that did not decode, why (default: it is not a decodable image).
            proba: the leaf probabilities of the decoded images, in order, when already computed
                (the server computes those of several requests in one pass).
        """
        import numpy as np

        from hierclass.inference import Predictions, aggregate, level_proba
        from hierclass.metrics import abstention_depth

        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        tax = self.taxonomy
        good = [im for images in products for im in images if im is not None]
        owner = np.array([p for p, images in enumerate(products) for im in images if im is not None], np.int64)
        answered, rows = np.zeros(0, np.int64), np.zeros((0, tax.n_leaves), np.float32)
        if good:
            answered, rows = aggregate(self.proba(good) if proba is None else proba, owner, "mean")
        preds = Predictions.from_proba(rows, tax, answered, k=min(topk, tax.n_leaves)) if good else None
        depth = None if preds is None or abstain_threshold is None else abstention_depth(preds, abstain_threshold)
        level1 = level_proba(rows, tax, 1) if good else rows
        at = {int(p): j for j, p in enumerate(answered)}
        out = []
        for p, (images, names) in enumerate(zip(products, sources, strict=True)):
            reasons = why[p] if why is not None else [None] * len(images)
            bad = [(name, reason or NOT_AN_IMAGE) for im, name, reason in zip(images, names, reasons, strict=True)
                   if im is None]  # fmt: skip
            problems = tuple(f"{name}: {reason}" for name, reason in bad)
            j = at.get(p)
            if j is None:
                reason = bad[0][1] if len(bad) == 1 else "no image"
                if len(bad) > 1:
                    reason = f"none of its {len(images)} images could be used ({problems[0]}, ...)"
                out.append(ImagePrediction(tuple(names), reason=reason, problems=problems))
                continue
            assert preds is not None
            leaves = tuple(
                RankedLeaf(int(tax.leaf_ids[leaf]), tax.leaf_path(int(leaf)), round(float(prob), 6))
                for leaf, prob in zip(preds.topk_leaf[j], preds.topk_prob[j], strict=True)
            )
            order = np.argsort(-level1[j], kind="stable")
            branches = tuple((tax.level1_names[b], round(float(level1[j, b]), 6)) for b in order)
            n_decoded = sum(im is not None for im in images)
            d = None if depth is None else int(depth[j])
            out.append(ImagePrediction(tuple(names), leaves, branches, n_decoded, d, problems=problems))
        return out

    def predict(
        self,
        images: Sequence[ImageInput | Sequence[ImageInput]],
        *,
        topk: int = 5,
        abstain_threshold: float | None = None,
    ) -> list[ImagePrediction]:
        """Answers for images: one per item, an item being one image or a list of one product's images.

        Files are read and decoded ``batch_size`` items at a time, so memory stays bounded for long lists.
        """
        items = [_as_product(item, i) for i, item in enumerate(images)]
        out: list[ImagePrediction] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            decoded, names, why = [], [], []
            for product in chunk:
                read = [_read(what) for _, what in product]
                decoded.append([None if r is None else self.decode(r) for r, _ in read])
                why.append([reason for _, reason in read])
                names.append([name for name, _ in product])
            out += self.predict_decoded(decoded, names, topk=topk, abstain_threshold=abstain_threshold, why=why)
        return out


def _as_product(item: Any, i: int) -> list[tuple[str, Path | bytes]]:
    """``[(name, path or bytes)]`` of one item (one image, or a list of one product's images)."""
    single = isinstance(item, (str, Path, bytes, bytearray, memoryview))
    if not single and not isinstance(item, Sequence):
        raise TypeError(f"item {i}: expected a path, bytes, or a list of them (one product), got {type(item).__name__}")
    product = [item] if single else list(item)
    out: list[tuple[str, Path | bytes]] = []
    for j, one in enumerate(product):
        if isinstance(one, (str, Path)):
            out.append((str(one), Path(one)))
        elif isinstance(one, (bytes, bytearray, memoryview)):
            out.append((f"image {i + 1}" if single else f"image {i + 1}.{j + 1}", bytes(one)))
        else:
            raise TypeError(f"item {i}: expected a path or bytes, got {type(one).__name__}")
    return out


def _read(what: Path | bytes) -> tuple[bytes | None, str | None]:
    """An image's bytes, or None and why it cannot be had."""
    if isinstance(what, bytes):
        return (what, None) if what else (None, "empty (0 bytes)")
    try:
        data = what.read_bytes()
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    return (data, None) if data else (None, "empty file (0 bytes)")


def image_files(data: Sequence[Path]) -> list[Path] | None:
    """The image files ``--data`` names when it names plain images, else None (a dump or a catalogue).

    Plain images are: one or more files that are neither a ``.bson`` dump nor a ``.csv`` catalogue, or
    one folder holding image files and no sub-folder (a folder of category sub-folders is a catalogue).

    Raises:
        DumpError: several sources that are not all image files, or a flat folder with no image file.
    """
    from hierclass.data.sources import IMAGE_SUFFIXES

    data = [Path(d) for d in data]
    kinds = ["dump" if d.suffix.lower() in (".bson", ".csv") and d.is_file() else "folder" if d.is_dir() else "image"
             for d in data]  # fmt: skip
    if len(data) == 1 and kinds[0] == "folder":
        folder = data[0]
        entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
        if any(p.is_dir() for p in entries):
            return None  # one folder per category: a catalogue
        files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DumpError(
                f"{folder}: no image files found (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}); put the photos in "
                "it, or one sub-folder per category"
            )
        return files
    if all(k == "image" for k in kinds):
        return data
    if len(data) == 1:
        return None
    odd = next(d for d, k in zip(data, kinds, strict=True) if k != "image")
    raise DumpError(f"{odd}: --data names several sources; give one dump, catalogue or folder, or only image files")


def prediction_rows(
    answers: Sequence[ImagePrediction], *, topk: int = 0, abstain_threshold: float | None = None
) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of the prediction CSV of image files, one row per answer.

    The columns are those of ``predict`` on a dump (:func:`hierclass.report.submission_rows`) with
    ``path`` in place of ``_id`` and a last ``reason`` column: an image that could not be used has
    empty prediction columns and says why there.
    """
    header = ["path", "category_id"]
    if abstain_threshold is not None:
        header += ["depth", "level1", "level2"]
    for i in range(1, topk + 1):
        header += [f"top{i}_category_id", f"top{i}_level1", f"top{i}_level2", f"top{i}_level3", f"top{i}_prob"]
    header.append("reason")
    rows = []
    for answer in answers:
        row: list[Any] = [" + ".join(answer.sources)]
        if not answer.leaves:
            rows.append([*row, *[""] * (len(header) - 2), answer.reason or ""])
            continue
        top = answer.leaves[0]
        row.append(top.category_id)
        if abstain_threshold is not None:
            d = answer.depth if answer.depth is not None else 3
            row[1] = row[1] if d == 3 else ""
            row += [d, top.path[0], top.path[1] if d >= 2 else ""]
        for i in range(topk):
            leaf = answer.leaves[i]
            row += [leaf.category_id, *leaf.path, f"{leaf.probability:.6f}"]
        rows.append([*row, ""])
    return header, rows


def write_prediction_csv(
    path: str | Path,
    answers: Sequence[ImagePrediction],
    *,
    topk: int = 0,
    abstain_threshold: float | None = None,
) -> Path:
    """Write :func:`prediction_rows` as a CSV, atomically (a temporary file, then a rename)."""
    import csv

    from hierclass.atomic import atomic_open

    header, rows = prediction_rows(answers, topk=topk, abstain_threshold=abstain_threshold)
    with atomic_open(Path(path), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)
