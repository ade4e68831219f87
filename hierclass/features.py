"""Backbone feature extraction into the on-disk feature cache, with torch or ONNX Runtime.

The heads (router, experts, flat) train on frozen backbone features, so the backbone runs
once over every image and its pooled features go to a :class:`~hierclass.featurestore.FeatureStore`.
:func:`extract_features` does that for a whole image source, resumably; :class:`FeatureExtractor`
computes features of an in-memory batch, for prediction code that must match the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from hierclass.data import PREPROCESS, EvalTransform, ImageDataset, image_rows, open_source, resolve_transform
from hierclass.defaults import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, Engine
from hierclass.errors import DumpError, TaxonomyError
from hierclass.featurestore import BAD, OK, FeatureStore, FeatureStoreError
from hierclass.models.backbone import create_backbone, data_config, pooled_dim, source_fingerprint
from hierclass.onnx_runtime import OnnxBackbone, export_onnx, stamp_of
from hierclass.taxonomy import Taxonomy

ONNX_FILE = "backbone.onnx"
LOCK_FILE = ".extract.lock"  # flock()ed by the one extract_features call writing the folder
SETTINGS = (  # what must be equal for a feature folder to be resumed (or reused as it is)
    "backbone",
    "pretrained",
    "pretrained_sha256",
    "data_config",
    "preprocess",
    "engine",
    "views",
    "source_path",
    "source_size",
    "n_images",
    "taxonomy_fingerprint",
    "top_stages",  # absent for pooled features
    "shard",  # absent for a whole store
)
SHARD_SETTINGS = tuple(k for k in SETTINGS if k not in ("n_images", "shard"))  # equal in every shard of a store


class FeatureExtractor:
    """Pooled backbone features of a batch of preprocessed images.

    Args:
        backbone: a timm model name.
        pretrained: where its weights come from (see :func:`~hierclass.models.backbone.create_backbone`).
        engine: ``onnx`` (exported once to ``onnx_path``, run by ONNX Runtime) or ``torch``
            (eager, ``inference_mode``, ``channels_last``).
        image_size: square input size instead of the model's native one (e.g. 128 for speed).
        onnx_path: where to keep the export; reused when it was made from the same weights and
            input size. Default: a temporary file that lives as long as the extractor.
        crop_pct: the fraction of the resized image kept by the centre crop instead of the
            model's (timm's default 0.875 cuts ~12% of each side; 1.0 keeps the whole image).
        top_stages: 0 for the pooled features; N >= 1 for the map of the trunk that leaves the
            model's last N stages to a trained top (:mod:`hierclass.models.trunk`), flattened.
        device: where the torch engine runs (``cpu``, ``cuda``, ``cuda:1``); default: the GPU when
            there is one. The onnx engine runs on the CPU.

    Attributes:
        model: the torch backbone (eval).
        data_config: the preprocessing (input_size, mean, std, interpolation, crop_pct, crop_mode).
        preprocess: the matching :class:`~hierclass.data.EvalTransform` (uint8 resize and crop, then
            normalisation, both per batch).
        dim: the feature size (``C*H*W`` for trunk maps).
        map_shape: ``[C, H, W]`` of the trunk maps (None for pooled features).
        stamp: backbone, weights and input size, stored in the ONNX file and the feature cache.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: str = DEFAULT_PRETRAINED,
        *,
        engine: Engine | str = Engine.onnx,
        image_size: int | None = None,
        onnx_path: str | Path | None = None,
        crop_pct: float | None = None,
        top_stages: int = 0,
        device: str | None = None,
    ) -> None:
        self.engine = Engine(engine)
        self.device = torch.device(resolve_device(device) if self.engine is Engine.torch else "cpu")
        self.image_size = image_size
        self.model = create_backbone(backbone, pretrained)
        self.data_config = _data_config(self.model, image_size, crop_pct)
        self.preprocess = resolve_transform(self.data_config)
        self.dim = pooled_dim(self.model)
        self.map_shape: tuple[int, int, int] | None = None
        if top_stages:
            from hierclass.models.trunk import checked_split

            self.model, _, self.map_shape = checked_split(self.model, top_stages, tuple(self.data_config["input_size"]))
            self.dim = int(np.prod(self.map_shape))
        self.stamp: dict[str, Any] = {
            "backbone": backbone,
            "pretrained": str(pretrained),
            "pretrained_sha256": source_fingerprint(str(pretrained)),
            "input_size": list(self.data_config["input_size"]),
            "input": "uint8 [B, H, W, 3], normalised in the graph",
            "mean": list(self.data_config["mean"]),
            "std": list(self.data_config["std"]),
            **({"top_stages": int(top_stages)} if top_stages else {}),
        }
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._onnx: OnnxBackbone | None = None
        if self.engine is Engine.onnx:
            if onnx_path is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="hierclass-onnx-")
                onnx_path = Path(self._tmp.name) / ONNX_FILE
            onnx_path = Path(onnx_path)
            if stamp_of(onnx_path) != self.stamp:
                size, mean, std = (self.data_config[k] for k in ("input_size", "mean", "std"))
                export_onnx(self.model, onnx_path, tuple(size), self.stamp, tuple(mean), tuple(std))
            self._onnx = OnnxBackbone(onnx_path)
        else:
            self.model = self.model.to(self.device, memory_format=torch.channels_last)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.device.type == "cpu":
            return self.preprocess.normalize(images)
        from hierclass.data.datasets import normalisation

        scale, shift = (t.to(images.device) for t in normalisation(self.preprocess.mean, self.preprocess.std))
        return torch.addcmul(shift, images.float(), scale)

    def transform(self) -> EvalTransform:
        """The preprocessing matching :attr:`data_config`: give it to an ImageDataset, whose ``collate``
        then yields the uint8 batches ``[B, 3, H, W]`` this extractor takes."""
        return self.preprocess

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Features ``[B, dim]`` (float32) of images ``[B, 3, H, W]``: uint8, as the datasets' collate
        gives them (normalised with the model), or, for the torch engine only, float already normalised."""
        expected = tuple(self.data_config["input_size"])
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}], got {list(images.shape)}")
        images = images.detach().cpu()
        if self._onnx is not None:
            if images.dtype != torch.uint8:
                raise ValueError(
                    f"the onnx engine takes uint8 images (from the dataset's collate), got {images.dtype}; "
                    "pass the uint8 batch, or use engine='torch' for normalised float input"
                )
            out = self._onnx(images.permute(0, 2, 3, 1).numpy())  # no copy for a channels-last batch
        else:
            with torch.inference_mode():
                if self.device.type != "cpu":
                    images = images.to(self.device, non_blocking=True)
                x = self._normalize(images) if images.dtype == torch.uint8 else images.float()
                out = self.model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
        return out.reshape(len(out), -1) if self.map_shape is not None else out


def extract_features(
    data: str | Path | Any,
    taxonomy: Taxonomy | str | Path,
    backbone: str = DEFAULT_BACKBONE,
    pretrained: str = DEFAULT_PRETRAINED,
    out: str | Path = "features",
    *,
    engine: Engine | str = Engine.onnx,
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    hflip: bool = False,
    crop_pct: float | None = None,
    top_stages: int = 0,
    progress: bool = True,
    strict: bool = False,
    shard: tuple[int, int] | None = None,
    device: str | None = None,
) -> FeatureStore:
    """Run the backbone once over every image of ``data`` and store the pooled features.

    One float16 row per image goes to the feature store at ``out``, with the image's
    product_id, product_row (its product's row in the source: two products sharing an ``_id``
    stay two), image_number and leaf (``taxonomy.encode(category_id, unknown=-1)``: -1 for
    unlabelled products and categories the taxonomy lacks). Images that do not decode get
    status BAD and are counted, never stop the job. A job that was killed resumes at the
    rows not written yet when run again with the same settings; a finished folder is
    returned as it is.

    Args:
        data: a dump path (or any source ``open_source`` takes), or an opened ImageSource.
        taxonomy: a Taxonomy or the path of its category_names.csv.
        backbone: a timm model name.
        pretrained: ``hub``, ``none``, ``efficientnet-lite0`` or a checkpoint path.
        out: the feature folder (created).
        engine: ``onnx`` (the export is kept as ``out/backbone.onnx``) or ``torch``.
        image_size: square input size instead of the model's native one.
        batch_size: images per forward pass.
        workers: DataLoader processes decoding images (0: in this process).
        hflip: also store features of horizontally flipped images (view ``hflip``).
        crop_pct: the centre crop's kept fraction instead of the model's (stored in ``data_config``).
        top_stages: 0 stores the pooled features; N >= 1 stores the trunk's output map (float16,
            flattened ``C*H*W``, shape in ``meta["map_shape"]``), for models that train the
            backbone's last N stages (``train-*`` on such a store builds CNN tops).
        progress: show a progress bar (with images/s) and the final bad-image line.
        strict: refuse a source with any problem (damaged or skipped documents, missing files,
            category_ids that are not leaves of the taxonomy) instead of reporting it.
        shard: ``(i, n)``: store only shard ``i`` of ``n`` (0-based), a contiguous block of the image rows
            cut at multiples of ``batch_size``, so that :func:`merge_features` of the ``n`` shards, each
            extracted with the same settings and batch size, is the store one unsharded run makes.
        device: where the torch engine runs (default: the GPU when there is one).

    Returns:
        The complete store. ``store.meta["last_run"]`` tells what this call did: images
        written, bad images, seconds (of which setup: model, ONNX export), images/s over the
        extraction loop (decoding included), and whether it resumed or found the work done.
        ``store.meta["source_problems"]`` lists, one line each, what of the source could not be
        used: documents the index skipped or lost, missing files, unknown category_ids.

    Raises:
        FeatureStoreError: ``out`` holds features made with other settings, or another
            extraction is writing to it (one writer per folder: an exclusive lock on ``out/.extract.lock``).
        TaxonomyError: more than half of the labelled images have a category_id that is not a
            leaf of the taxonomy (the wrong taxonomy for this dump).
        HierclassError: a bad source, taxonomy or backbone, each with its fix.
    """
    start = time.perf_counter()
    out = Path(out)
    engine = Engine(engine)
    tax = taxonomy if isinstance(taxonomy, Taxonomy) else Taxonomy.from_csv(taxonomy)
    source = data if hasattr(data, "read_images") else open_source(data, progress=progress, taxonomy=tax, strict=strict)
    problems = list(getattr(source, "problems", list)())
    report = getattr(source, "report", None)
    if strict and report is not None and not report.ok:
        raise DumpError(report.problems()[0])
    if len(source) == 0:
        why = f" ({problems[0]})" if problems else ""
        raise DumpError(f"{source.path}: no product with an image found{why}; is this a Cdiscount-format dump?")
    label_problem = check_labels(tax, source.category_ids, source.n_images, Path(source.path))
    if label_problem:
        if strict:
            raise TaxonomyError(label_problem)
        problems.append(label_problem)
    product_row, image_number = image_rows(source)
    product_row = np.asarray(product_row, dtype=np.int64)
    image_number = np.asarray(image_number, dtype=np.int64)
    shard_meta: dict[str, Any] | None = None
    if shard is not None:
        lo, hi = shard_rows(len(product_row), shard, batch_size)
        shard_meta = {"index": shard[0], "count": shard[1], "rows": [lo, hi], "batch_size": batch_size}
        shard_meta |= {"n_images_total": len(product_row), "n_products_total": len(source)}
        product_row, image_number = product_row[lo:hi], image_number[lo:hi]
    product_id = np.asarray(source.product_ids, dtype=np.int64)[product_row]
    source_path = Path(source.path).resolve()
    views = ("orig", "hflip") if hflip else ("orig",)

    # Settings first: a folder made with other settings is refused before any export or write.
    model = create_backbone(backbone, pretrained)
    settings = {
        "backbone": backbone,
        "pretrained": str(pretrained),
        "pretrained_sha256": source_fingerprint(str(pretrained)),
        "data_config": _data_config(model, image_size, crop_pct),
        "preprocess": PREPROCESS,
        "engine": engine.value,
        "views": list(views),
        "source_path": str(source_path),
        "source_size": source_path.stat().st_size if source_path.is_file() else None,
        "n_images": len(product_row),
        "taxonomy_fingerprint": tax.fingerprint,
        **({"shard": shard_meta} if shard_meta is not None else {}),
    }
    dim = pooled_dim(model)
    shape_meta: dict[str, Any] = {}
    if top_stages < 0:
        raise ValueError(f"top_stages must be >= 0, got {top_stages}")
    if top_stages:
        from hierclass.models.trunk import checked_split

        shape = checked_split(model, top_stages, tuple(settings["data_config"]["input_size"]))[2]
        dim = int(np.prod(shape))
        settings["top_stages"] = int(top_stages)
        shape_meta = {"map_shape": list(shape), "num_features": pooled_dim(model)}
    del model
    with _exclusive(out):  # one writer per folder
        resumed = (out / "meta.json").is_file()
        if resumed:
            store = FeatureStore.open(out, mode="r+", require_complete=False)
            _check_same_settings(store, settings)
            if not (np.array_equal(store.product_id, product_id) and np.array_equal(store.image_number, image_number)):
                raise FeatureStoreError(
                    f"{out}: its image rows differ from {source_path} (the source changed since); "
                    "extract into a new --out folder"
                )
            store.product_row = product_row  # its rows are the source's: a store made before product_row gets it
            if store.meta.get("complete"):
                store = FeatureStore.open(out, mode="r")  # nothing to write: hand it back read-only
                store.product_row = product_row
                store.meta["source_problems"] = problems
                store.meta["last_run"] = _run_summary(0, 0, time.perf_counter() - start, 0.0, resumed=False, done=True)
                return store
        else:
            leaf = tax.encode(np.asarray(source.category_ids, dtype=np.int64)[product_row], unknown=-1)
            meta = {
                **settings,
                **shape_meta,
                "taxonomy_source": tax.source,
                "n_products": len(source) if shard is None else len(np.unique(product_row)),
                "source_problems": problems,
            }
            store = FeatureStore.create(
                out,
                dim=dim,
                product_id=product_id,
                image_number=image_number,
                leaf=leaf,
                meta=meta,
                views=views,
                product_row=product_row,
            )

        extractor = FeatureExtractor(
            backbone,
            pretrained,
            engine=engine,
            image_size=image_size,
            onnx_path=out / ONNX_FILE if engine is Engine.onnx else None,
            crop_pct=crop_pct,
            top_stages=top_stages,
            device=device,
        )
        pending = store.pending
        dataset = ImageDataset(source, extractor.transform(), product_row[pending], image_number[pending])
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=dataset.collate,  # decoded images resized and cropped per batch, in the workers
            persistent_workers=False,
        )
        written = bad = 0
        loop_start = time.perf_counter()
        batches = iter(loader)
        with tqdm(total=len(pending), unit="img", desc="features", disable=not progress, smoothing=0.1) as bar:
            while True:
                # Decoding in this process (workers=0): one thread, as in a DataLoader worker (intra-op
                # threads on small per-image ops only added synchronisation on 2 busy cores).
                with _torch_threads(1):
                    batch = next(batches, None)
                if batch is None:
                    break
                images, good, failed = batch
                good_rows, bad_rows = pending[good], pending[failed]
                if len(good_rows):
                    batch = torch.cat([images, images.flip(-1)]) if hflip else images
                    values = _to_float16(extractor(batch), out)
                    n = len(good_rows)
                    store.write(good_rows, {"orig": values[:n], **({"hflip": values[n:]} if hflip else {})}, OK)
                if len(bad_rows):
                    store.write(bad_rows, {}, BAD)
                written += len(good_rows)
                bad += len(bad_rows)
                bar.update(len(good_rows) + len(bad_rows))
                if bad:
                    bar.set_postfix(bad=bad)
        end = time.perf_counter()
        summary = _run_summary(written, bad, end - start, end - loop_start, resumed=resumed, done=False)
        store.mark_complete(last_run=summary)
        store.meta["source_problems"] = problems
        n_bad = int(store.meta["n_bad"])
        if progress and n_bad:
            rows = np.flatnonzero(np.asarray(store.status) == BAD)[:3]
            examples = ", ".join(f"product {store.product_id[r]} image {store.image_number[r]}" for r in rows)
            tqdm.write(f"{n_bad} image(s) did not decode and were skipped (status BAD), e.g. {examples}")
        return store


def check_labels(taxonomy: Taxonomy, category_ids: np.ndarray, n_images: np.ndarray, source: Path) -> str | None:
    """A one-line warning naming the category_ids of ``source`` that are not leaves of ``taxonomy``.

    Products without a label (category_id -1) are not counted; other negative ids are.

    Args:
        taxonomy: the taxonomy the features are labelled with.
        category_ids: one per product.
        n_images: images of each product.
        source: the dump or catalogue (for the message).

    Returns:
        None when every labelled product's category_id is a leaf.

    Raises:
        TaxonomyError: more than half of the labelled images match no leaf.
    """
    ids = np.asarray(category_ids, dtype=np.int64)
    weight = np.asarray(n_images, dtype=np.int64)
    labelled = ids != -1
    unknown = labelled & (taxonomy.encode(ids, unknown=-1) < 0)
    if not unknown.any():
        return None
    n_unknown, n_labelled = int(weight[unknown].sum()), int(weight[labelled].sum())
    names = np.unique(ids[unknown])
    shown = ", ".join(str(int(c)) for c in names[:5]) + (", ..." if len(names) > 5 else "")
    what = (
        f"{source}: {n_unknown} of {n_labelled} labelled image(s) ({int(unknown.sum())} product(s)) have a "
        f"category_id that is not a leaf of {taxonomy.source} ({len(names)} id(s): {shown})"
    )
    if 2 * n_unknown > n_labelled:
        raise TaxonomyError(
            f"{what}; is this the right taxonomy? pass the category_names.csv the dump was labelled with"
        )
    return f"{what}; they are kept as unlabelled (leaf -1)"


def shard_rows(n_images: int, shard: tuple[int, int], batch_size: int) -> tuple[int, int]:
    """The image rows ``[lo, hi)`` of shard ``i`` of ``n``: a contiguous block cut at multiples of
    ``batch_size``, so each shard's batches are exactly those of one unsharded run.

    Raises:
        ValueError: ``i`` outside ``0 .. n - 1`` or ``n < 1``.
    """
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: expected I/N with N >= 1 and 0 <= I < N (e.g. 0/4 .. 3/4)")
    n_batches = -(-n_images // batch_size)
    lo, hi = n_batches * i // n, n_batches * (i + 1) // n
    return min(lo * batch_size, n_images), min(hi * batch_size, n_images)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)``.

    Raises:
        HierclassError: not of that form, or ``I`` outside ``0 .. N - 1``.
    """
    from hierclass.errors import HierclassError

    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise HierclassError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of 4 shards") from None
    if n < 1 or not 0 <= i < n:
        raise HierclassError(f"--shard {text}: I must be 0 to N-1 (the first of 4 shards is 0/4)")
    return i, n


def resolve_device(device: str | None) -> str:
    """The torch device to run on: as given, else the GPU when there is one, else the CPU.

    Raises:
        HierclassError: an unknown device, or CUDA asked for where torch sees no GPU.
    """
    from hierclass.errors import HierclassError

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device.startswith("cuda")):
        raise HierclassError(f"--device {device!r} is not supported; use cpu or cuda (cuda:N for a given GPU)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HierclassError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def merge_features(shards: list[str | Path], out: str | Path) -> FeatureStore:
    """Join the ``n`` shards of one extraction (``extract_features(..., shard=(i, n))``) into one store.

    The result holds the same rows, features, statuses and settings as the store one unsharded run
    with the same settings and batch size makes (its ``last_run`` says it was merged).

    Args:
        shards: the shard folders, in any order; each must be complete.
        out: the merged store's folder (must not hold a store yet).

    Raises:
        FeatureStoreError: a shard missing or twice, incomplete, or extracted with other settings.
    """
    start = time.perf_counter()
    stores = [FeatureStore.open(path) for path in shards]
    if not stores:
        raise FeatureStoreError("no shard to merge; pass the folders extract-features --shard I/N wrote")
    for store in stores:
        if "shard" not in store.meta:
            raise FeatureStoreError(f"{store.root}: a whole feature store, not a shard (made without --shard)")
    stores.sort(key=lambda st: st.meta["shard"]["index"])
    first = stores[0].meta
    count = int(first["shard"]["count"])
    found = [int(st.meta["shard"]["index"]) for st in stores]
    if found != list(range(count)):
        missing = sorted(set(range(count)) - set(found))
        what = f"missing {', '.join(f'{i}/{count}' for i in missing)}" if missing else "a shard given twice"
        raise FeatureStoreError(f"{stores[0].root}: the shards of {count} do not add up ({what})")
    for store in stores[1:]:
        differ = [k for k in (*SHARD_SETTINGS, "map_shape") if store.meta.get(k) != first.get(k)]
        other = store.meta["shard"]
        if other["count"] != count or other["batch_size"] != first["shard"]["batch_size"]:
            differ.append("shard count or batch size")
        if differ:
            raise FeatureStoreError(
                f"{store.root}: extracted with other settings than {stores[0].root} ({', '.join(differ)}); "
                "extract every shard with the same options"
            )
    bounds = [st.meta["shard"]["rows"] for st in stores]
    total = int(first["shard"]["n_images_total"])
    if bounds[0][0] != 0 or bounds[-1][1] != total or any(a[1] != b[0] for a, b in itertools.pairwise(bounds)):
        raise FeatureStoreError(f"{stores[0].root}: the shards' rows {bounds} do not cover 0..{total} once")
    drop = {"shard", "last_run", "complete", "n_bad", "format_version", "n_images", "dim", "views"}
    meta = {k: v for k, v in first.items() if k not in drop}
    meta["n_images"] = total
    meta["n_products"] = int(first["shard"]["n_products_total"])
    store = FeatureStore.create(
        out,
        dim=stores[0].dim,
        product_id=np.concatenate([st.product_id for st in stores]),
        image_number=np.concatenate([st.image_number for st in stores]),
        leaf=np.concatenate([st.leaf for st in stores]),
        meta=meta,
        views=tuple(first["views"]),
    )
    chunk = 65_536
    for shard, (lo, _) in zip(stores, bounds, strict=True):
        for a in range(0, shard.n_images, chunk):
            b = min(a + chunk, shard.n_images)
            views = {view: np.asarray(shard.features(view)[a:b]) for view in first["views"]}
            store.write(np.arange(lo + a, lo + b), views, np.asarray(shard.status[a:b]))
    seconds = time.perf_counter() - start
    summary = _run_summary(0, 0, seconds, seconds, resumed=False, done=False)
    store.mark_complete(last_run={**summary, "merged_shards": [str(st.root) for st in stores]})
    return store


# ---------------------------------------------------------------------- helpers
def _data_config(model: torch.nn.Module, image_size: int | None, crop_pct: float | None) -> dict[str, Any]:
    config = data_config(model, image_size)
    if crop_pct is not None:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1] (the fraction kept by the centre crop), got {crop_pct}")
        config["crop_pct"] = float(crop_pct)
    return config


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (created) for the block, or fail at once if another process has it."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when fd closes, also if this process dies
        except BlockingIOError:
            raise FeatureStoreError(
                f"{out}: another extract-features is writing to this folder (it holds {LOCK_FILE}); "
                "wait for it to finish, or pass another --out folder"
            ) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous number."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_same_settings(store: FeatureStore, settings: dict[str, Any]) -> None:
    stored = {key: store.meta.get(key) for key in SETTINGS}
    differ = [key for key in SETTINGS if stored[key] != settings.get(key)]
    if differ:
        changes = "; ".join(f"{key} {stored[key]!r} -> {settings.get(key)!r}" for key in differ[:3])
        raise FeatureStoreError(
            f"{store.root}: holds features made with other settings ({changes}); "
            "rerun with the same options to resume it, or pass another --out folder"
        )


def _to_float16(values: np.ndarray, out: Path) -> np.ndarray:
    half = values.astype(np.float16)
    if not np.isfinite(half).all():
        raise FeatureStoreError(
            f"{out}: the backbone gave features beyond float16's range (max |x| {np.abs(values).max():.3g}); "
            "use a backbone with bounded pooled features"
        )
    return half


def _run_summary(
    images: int, bad: int, seconds: float, loop_seconds: float, *, resumed: bool, done: bool
) -> dict[str, Any]:
    return {
        "images": images,
        "bad": bad,
        "seconds": round(seconds, 3),  # the whole call, model loading and ONNX export included
        "setup_seconds": round(seconds - loop_seconds, 3),
        "images_per_s": round((images + bad) / loop_seconds, 1) if loop_seconds > 0 else 0.0,  # decode + model
        "resumed": resumed,
        "already_complete": done,
    }
