"""A run folder: one experiment's heads, the taxonomy they were trained with, and a manifest.

::

    RUN/category_names.csv   a copy of the taxonomy (so the run works from any directory)
    RUN/run.json             the manifest: the taxonomy's fingerprint, and per head how it was trained
    RUN/router/  RUN/experts/  RUN/flat/   one checkpoint each (hierclass.checkpoint)

:meth:`Run.load` gives a run's models (``flat``, ``hierarchical``, and ``fused`` when the run
holds a fitted fusion weight), with the temperatures it was calibrated with and the
:class:`~hierclass.spec.FeatureSpec` of the features they read; :meth:`Run.calibrate` fits the
temperatures and the fusion weight and stores them in ``run.json``, so ``evaluate``,
``predict`` and ``serve`` all read one calibration.

Importing this module imports neither torch nor numpy (the command line imports it at start);
loading models does.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hierclass.atomic import atomic_open
from hierclass.errors import CheckpointError, HierclassError
from hierclass.spec import FeatureSpec
from hierclass.taxonomy import Taxonomy

if TYPE_CHECKING:
    import numpy as np

    from hierclass.features import FeatureExtractor
    from hierclass.featurestore import FeatureStore
    from hierclass.inference import Classifier, FeatureStores
    from hierclass.predictor import ImageInput, ImagePrediction, ImagePredictor

TAXONOMY_FILE = "category_names.csv"
MANIFEST_FILE = "run.json"
HEADS = ("router", "experts", "flat")


class Run:
    """The folder of one experiment.

    Args:
        root: the run directory (created on the first head trained into it).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.taxonomy: Taxonomy | None = None
        self.models: dict[str, Classifier] = {}
        self._extractors: dict[str, FeatureExtractor] = {}  # the backbone, built once per engine

    @classmethod
    def load(
        cls,
        root: str | Path,
        taxonomy: Taxonomy | None = None,
        *,
        combine: str = "soft",
        k: int = 3,
        batch_size: int = 4096,
        only_flat: bool = False,
        calibrated: bool = True,
    ) -> Run:
        """A run with its models loaded.

        Args:
            root: the run directory.
            taxonomy: the taxonomy to check the heads against; default the run's copy, else the
                file its checkpoints recorded.
            combine, k: how the hierarchical model combines router and experts.
            batch_size: rows per forward pass.
            only_flat: load the flat model alone (an unfinished router/ or experts/ does not matter).
            calibrated: apply the temperatures and fusion weight stored by :meth:`calibrate`.

        Raises:
            CheckpointError: no checkpoint, a router without experts, or heads of another taxonomy.
        """
        run = cls(root)
        run.taxonomy = taxonomy or run.recorded_taxonomy()
        if only_flat and (run.root / "flat").is_dir():
            from hierclass.inference import FlatClassifier

            run.models = {"flat": FlatClassifier.from_run(run.root, run.taxonomy, batch_size=batch_size)}
        else:
            run.models = load_models(run.root, run.taxonomy, combine=combine, k=k, batch_size=batch_size)
        if calibrated:
            run.apply_calibration()
        return run

    def recorded_taxonomy(self) -> Taxonomy:
        """The run's copy of its taxonomy, else the file its checkpoints recorded, if still there."""
        copy = self.taxonomy_copy()
        if copy is not None:
            return copy
        from hierclass.checkpoint import read_meta

        for kind in ("flat", "router", "experts"):  # a head whose training never finished has no meta.json
            if (self.root / kind / "meta.json").is_file():
                source = (read_meta(self.root / kind).get("taxonomy") or {}).get("source")
                if source and Path(source).is_file():
                    return Taxonomy.from_csv(source)
                raise CheckpointError(
                    f"{self.root / kind}: the taxonomy it was trained with ({source}) is not there; pass --taxonomy"
                )
        raise CheckpointError(
            f"{self.root}: no flat/, router/ or experts/ checkpoint here; pass the RUN_DIR the train commands wrote to"
        )

    @property
    def spec(self) -> FeatureSpec:
        """What the run's models read (checked the same for every head)."""
        return FeatureSpec.from_meta(features_meta(self.models))

    def feature_extractor(self, engine: str = "onnx") -> FeatureExtractor:
        """The backbone (and preprocessing) the run's heads read features of, built on the first call.

        With the ONNX engine the export is kept in ``RUN/onnx/`` and reused by every later start
        (:func:`hierclass.predictor.onnx_cache_path`).
        """
        if engine not in self._extractors:
            from hierclass.predictor import build_extractor

            self._extractors[engine] = build_extractor(self, engine)
        return self._extractors[engine]

    def image_predictor(
        self, model: str | None = None, *, engine: str = "onnx", batch_size: int = 32
    ) -> ImagePredictor:
        """The run's ``model`` on plain images (see :class:`hierclass.predictor.ImagePredictor`)."""
        from hierclass.predictor import ImagePredictor

        return ImagePredictor(self, self.feature_extractor(engine), model, batch_size=batch_size)

    def predict_images(
        self,
        images: Sequence[ImageInput | Sequence[ImageInput]],
        *,
        model: str | None = None,
        topk: int = 5,
        abstain_threshold: float | None = None,
        engine: str = "onnx",
        batch_size: int = 32,
    ) -> list[ImagePrediction]:
        """Rank the leaves for image files or encoded images, each alone or grouped into products.

        Each image is decoded and preprocessed as the run's features were (its
        :class:`~hierclass.spec.FeatureSpec`), so the answers equal ``hierclass predict``'s on the same
        pictures. An image that does not decode gets an empty answer with a ``reason``, never a leaf.

        Args:
            images: one item per answer: a path or bytes (one image), or a list of them (one
                product's images, combined by the mean of their probabilities).
            model: ``hierarchical`` (default when the run has it), ``flat`` or ``fused``.
            topk: leaves ranked per answer.
            abstain_threshold: below this probability the answer stops at level 2 or 1 (``depth``).
            engine: ``onnx`` (exported once into ``RUN/onnx/``) or ``torch``.
            batch_size: images per backbone pass.

        Returns:
            One :class:`~hierclass.predictor.ImagePrediction` per item, in order: the ranked leaves with
            their category_id, ``[level1, level2, leaf]`` path and probability, and the level-1 distribution.

        Example:
            >>> run = Run.load("runs/fashion")
            >>> [p.leaves[0].path for p in run.predict_images(["shirt.jpg", ["shoe-1.jpg", "shoe-2.jpg"]])]
        """
        predictor = self.image_predictor(model, engine=engine, batch_size=batch_size)
        return predictor.predict(images, topk=topk, abstain_threshold=abstain_threshold)

    def calibration(self) -> dict[str, Any] | None:
        """The stored calibration: ``{"models": {name: settings}, "on": where it was fitted}``, or None."""
        return self.manifest().get("calibration")

    def apply_calibration(self) -> None:
        """Set the stored temperatures (and add ``fused`` with its stored weight) on the loaded models."""
        stored = self.calibration()
        if not stored:
            return
        from hierclass.inference import FlatClassifier, FusedClassifier, HierarchicalClassifier

        fitted = stored.get("models") or {}
        for name, clf in self.models.items():
            settings = fitted.get(name) or {}
            if isinstance(clf, FlatClassifier) and "temperature" in settings:
                clf.temperature = float(settings["temperature"])
            if isinstance(clf, HierarchicalClassifier):
                for key in ("router_temperature", "expert_temperature"):
                    if key in settings:
                        setattr(clf, key, float(settings[key]))
        alpha = (fitted.get("fused") or {}).get("alpha")
        if alpha is not None and {"flat", "hierarchical"} <= set(self.models):
            self.models["fused"] = FusedClassifier(
                self.models["flat"],  # type: ignore[arg-type]
                self.models["hierarchical"],  # type: ignore[arg-type]
                alpha=float(alpha),
            )

    def calibrate(self, store: FeatureStore, *, tune_fused: bool = False, save: bool = True) -> dict[str, Any]:
        """Fit the temperatures (and the fusion weight) on ``store`` and keep them in ``run.json``.

        When ``store`` holds the features the run was trained on, only the images its heads held
        out of training are used (:func:`training_holdout`); otherwise every labelled image.

        Returns:
            The record of where it was fitted (:func:`calibration_record`).
        """
        held = training_holdout(store, self.models)
        fitted = calibrate(self.models, store, tune_fused=tune_fused, rows=held)
        record = calibration_record(store, held)
        if save:
            self._update(lambda m: m.__setitem__("calibration", {"models": fitted, "on": record}))
        return record

    def head_dir(self, kind: str) -> Path:
        """Where the ``kind`` head's checkpoint lives."""
        if kind not in HEADS:
            raise ValueError(f"kind={kind!r}; expected one of {HEADS}")
        return self.root / kind

    @property
    def taxonomy_path(self) -> Path:
        return self.root / TAXONOMY_FILE

    def taxonomy_copy(self) -> Taxonomy | None:
        """The taxonomy copied into the run, or None for a run that has none (made by an older version)."""
        return Taxonomy.from_csv(self.taxonomy_path) if self.taxonomy_path.is_file() else None

    def manifest(self) -> dict[str, Any]:
        """The manifest (empty for a new run)."""
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise HierclassError(f"{path}: unreadable run manifest ({e}); delete it and retrain, or fix it") from None

    def adopt_taxonomy(self, taxonomy: Taxonomy) -> None:
        """Copy ``taxonomy`` into the run, or check it is the one the run already holds.

        Raises:
            HierclassError: the run holds heads of another taxonomy.
        """
        have = self.taxonomy_copy()
        if have is not None:
            if have.fingerprint != taxonomy.fingerprint:
                raise HierclassError(
                    f"{self.root}: this run holds heads of taxonomy {have.fingerprint} ({self.taxonomy_path}), "
                    f"not {taxonomy.fingerprint} ({taxonomy.source}); train into another run folder"
                )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.taxonomy_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["category_id", "category_level1", "category_level2", "category_level3"])
            writer.writerows((r.category_id, r.level1, r.level2, r.level3) for r in taxonomy.rows)
        self._update(lambda m: m.update(taxonomy={"file": TAXONOMY_FILE, "fingerprint": taxonomy.fingerprint}))

    def record_head(self, kind: str, entry: dict[str, Any]) -> None:
        """Note in the manifest how the ``kind`` head was trained (``entry``: JSON values)."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._update(lambda m: m.setdefault("heads", {}).__setitem__(kind, {"trained_at": stamp, **entry}))

    def _update(self, change: Any) -> None:
        manifest = self.manifest()
        change(manifest)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.root / MANIFEST_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.write("\n")


# ---------------------------------------------------------------------------- models of a run
def load_models(
    run_dir: str | Path,
    taxonomy: Taxonomy,
    *,
    combine: str = "soft",
    k: int = 3,
    batch_size: int = 4096,
) -> dict[str, Classifier]:
    """The models of a training run: ``flat`` if ``RUN_DIR/flat`` exists, ``hierarchical`` if
    ``RUN_DIR/router`` and ``RUN_DIR/experts`` do (either alone is fine).

    Raises:
        CheckpointError: the run has neither, or a checkpoint does not fit ``taxonomy``.
    """
    from hierclass.inference import FlatClassifier, HierarchicalClassifier

    run_dir = Path(run_dir)
    models: dict[str, Classifier] = {}
    if (run_dir / "flat").is_dir():
        models["flat"] = FlatClassifier.from_run(run_dir, taxonomy, batch_size=batch_size)
    has = [(run_dir / kind).is_dir() for kind in ("router", "experts")]
    if all(has):
        models["hierarchical"] = HierarchicalClassifier.from_run(
            run_dir, taxonomy, combine=combine, k=k, batch_size=batch_size
        )  # type: ignore[arg-type]
    elif any(has):
        missing = "experts" if has[0] else "router"
        raise CheckpointError(f"{run_dir}: has no {missing}/ checkpoint; train it (hierclass train-{missing})")
    if not models:
        raise CheckpointError(
            f"{run_dir}: no flat/, router/ or experts/ checkpoint here; pass the RUN_DIR the train commands wrote to"
        )
    return models


def features_meta(classifiers: Mapping[str, Classifier]) -> dict[str, Any]:
    """The feature config the heads were trained on (``meta["features"]`` of their checkpoints).

    Raises:
        CheckpointError: two heads of the run were trained on features of different backbones.
    """
    from hierclass.checkpoint import backbone_config

    found: dict[str, Any] | None = None
    first = ""
    for clf in classifiers.values():
        for head, meta in clf.meta.items():
            feats = meta.get("features") or {}
            if found is None:
                found, first = feats, head
            elif backbone_config(feats) != backbone_config(found):
                raise CheckpointError(
                    f"the {head} and {first} heads were trained on features of different backbones "
                    f"({backbone_config(feats)} vs {backbone_config(found)}); retrain them on the same features"
                )
    return found or {}


def check_store(
    store: FeatureStore | FeatureStores, classifiers: Mapping[str, Classifier], run: str | Path | None = None
) -> None:
    """Refuse features of another taxonomy, width or backbone than the heads were trained on.

    Args:
        store: the features to score or calibrate on.
        classifiers: the models that will read them.
        run: the run directory the heads come from (named in the error).
    """
    from hierclass.checkpoint import backbone_config
    from hierclass.featurestore import FeatureStoreError
    from hierclass.inference import EnsembleClassifier, FeatureStores

    if isinstance(store, FeatureStores):  # member i of each ensemble reads store i
        for i, member in enumerate(store.stores):
            check_store(
                member,
                {n: c.members[i] if isinstance(c, EnsembleClassifier) else c for n, c in classifiers.items()},
                run,
            )
        return
    taxonomy = next(iter(classifiers.values())).taxonomy
    store.check_taxonomy(taxonomy.fingerprint, f"the taxonomy {taxonomy.source}")
    for clf in classifiers.values():
        for head, meta in clf.meta.items():
            width = (meta.get("head") or {}).get("dim")
            if width is not None and int(width) != store.dim:
                where = f"the {head} head of {run}" if run is not None else f"the {head} head"
                raise FeatureStoreError(
                    f"{store.root}: features are {store.dim} wide but {where} takes {int(width)}; "
                    "extract the features with the backbone the run was trained on"
                )
    trained = backbone_config(features_meta(classifiers))
    here = backbone_config(store.meta)
    if trained and here != trained:
        diff = sorted(k for k in set(trained) | set(here) if trained.get(k) != here.get(k))
        raise FeatureStoreError(
            f"{store.root}: features differ from the ones the heads were trained on in {', '.join(diff)} "
            f"({', '.join(f'{k}={here.get(k)!r} vs {trained.get(k)!r}' for k in diff)}); "
            "extract the features with the run's backbone"
        )


def training_holdout(store: FeatureStore, classifiers: Mapping[str, Classifier]) -> np.ndarray | None:
    """The image rows of ``store`` that the heads held out of their training, when ``store`` is their training set.

    Every head records the holdout it carved from its training features (``training.holdout``:
    fraction and seed of :func:`hierclass.data.splits.holdout_mask`) and how many labelled images
    it trained and early-stopped on. ``store`` is taken for the training set when the same
    holdout drawn on it gives the flat and router heads those same counts.

    Returns:
        A boolean mask over the store's rows (True: held out), or None when a head records no
        holdout, the heads disagree on it, or ``store`` is not what they were trained on.
    """

    from hierclass.data.splits import holdout_mask

    spec: dict[str, Any] | None = None
    for clf in classifiers.values():
        for meta in clf.meta.values():
            held = (meta.get("training") or {}).get("holdout")
            if not held or (spec is not None and held != spec):
                return None
            spec = held
    if spec is None:
        return None
    mask = holdout_mask(store.product_id, store.leaf, fraction=spec["fraction"], seed=spec["seed"])
    labelled = store.valid & (store.leaf >= 0)
    checked = 0
    for clf in classifiers.values():
        for head, meta in clf.meta.items():
            metrics = meta.get("metrics") or {}
            if head in ("flat", "router") and "n_holdout" in metrics:
                if (int((labelled & mask).sum()), int((labelled & ~mask).sum())) != (
                    metrics["n_holdout"],
                    metrics["n_train"],
                ):
                    return None
                checked += 1
    return mask if checked and (labelled & mask).any() else None


def early_stopping_source(classifiers: Mapping[str, Classifier]) -> str | None:
    """What the heads chose their training settings (L2 strength, epoch) on, as they recorded it."""
    sources = {
        (meta.get("metrics") or {}).get("holdout_source") for clf in classifiers.values() for meta in clf.meta.values()
    } - {None}
    return "; ".join(sorted(sources)) or None


def calibrate(
    models: Mapping[str, Classifier],
    store: FeatureStore,
    *,
    tune_fused: bool = True,
    rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fit every model's temperatures (and fused alphas) on labelled features, in place.

    Flat and hierarchical models get their temperatures (:meth:`FlatClassifier.calibrate`,
    :meth:`HierarchicalClassifier.calibrate`) first; then each fused model's ``alpha`` is
    chosen by NLL over its (calibrated) parts when ``tune_fused``.

    Fit them on images the heads were not trained on and that will not be scored: the
    holdout of the training set (``rows=training_holdout(train_store, models)``) is both.

    Args:
        models: the models to calibrate.
        store: the features to fit on.
        tune_fused: also choose each fused model's ``alpha``.
        rows: a boolean mask over the store's rows: fit on these only (default: every labelled row).

    Returns:
        What was fitted, per model (also in each model's ``settings`` in the report).
    """
    import numpy as np

    from hierclass.featurestore import FeatureStoreError
    from hierclass.inference import FlatClassifier, FusedClassifier, HierarchicalClassifier, settings_of

    check_store(store, models)
    features = store.features()
    use = store.valid if rows is None else store.valid & np.asarray(rows, dtype=bool)
    if rows is not None and len(rows) != store.n_images:
        raise ValueError(f"rows has {len(rows)} entries but {store.root} has {store.n_images} images")
    leaf = np.where(use, store.leaf, -1)
    if not (leaf >= 0).any():
        raise FeatureStoreError(f"{store.root}: no labelled images to calibrate on among the rows given")
    fitted: dict[str, Any] = {}
    done: set[int] = set()
    for name, clf in models.items():
        if isinstance(clf, (FlatClassifier, HierarchicalClassifier)) and id(clf) not in done:
            clf.calibrate(features, leaf)
            done.add(id(clf))
            fitted[name] = settings_of(clf)
    for name, clf in models.items():
        if isinstance(clf, FusedClassifier):
            for part in (clf.flat, clf.hierarchical):
                if id(part) not in done:
                    part.calibrate(features, leaf)
                    done.add(id(part))
            if tune_fused:
                clf.fit_alpha(features, leaf)
            fitted[name] = settings_of(clf)
    return fitted


def calibration_record(store: FeatureStore, rows: np.ndarray | None = None) -> dict[str, Any]:
    """What :func:`evaluate` records of a calibration done by :func:`calibrate` on ``store`` with ``rows``."""
    import numpy as np

    use = store.valid & (store.leaf >= 0)
    if rows is not None:
        use &= np.asarray(rows, dtype=bool)
    return {"store": str(store.root), "rows": "all" if rows is None else "holdout", "n_images": int(use.sum())}
