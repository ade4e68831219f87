"""``hierclass evaluate`` (flat vs hierarchical report) and ``hierclass predict`` (submission CSV)."""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hierclass.cli.app import Progress, command, fail
from hierclass.outputs import check_writable_dir, check_writable_file

if TYPE_CHECKING:  # the commands import these when they run: --help stays fast
    from hierclass.featurestore import FeatureStore
    from hierclass.inference import Classifier, FeatureStores
    from hierclass.run import Run
    from hierclass.taxonomy import Taxonomy


class Combine(str, Enum):
    soft = "soft"
    topk = "topk"
    hard = "hard"


class Aggregate(str, Enum):
    mean = "mean"
    logmean = "logmean"
    max = "max"


class Model(str, Enum):
    hierarchical = "hierarchical"
    flat = "flat"
    fused = "fused"


RunDirs = Annotated[
    list[Path],
    typer.Option(
        "--run",
        exists=True,
        file_okay=False,
        help="The run directory (RUN/router, experts, flat). Repeat it to average several runs (an ensemble).",
    ),
]
FeaturesOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--features",
        exists=True,
        file_okay=False,
        help="A feature folder to score; with several --run, one for all or one per run, in order.",
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data", exists=True, help="A .bson dump, .csv catalogue or image folder; features are extracted first."
    ),
]
PredictDataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--data",
        exists=True,
        help="A .bson dump, .csv catalogue or folder of category folders; or image files (repeat --data) "
        "or a folder of images, each predicted alone.",
    ),
]
TaxonomyOpt = Annotated[
    Path | None,
    typer.Option(
        "--taxonomy", exists=True, dir_okay=False, help="The category_names.csv; default: the one the run recorded."
    ),
]
CombineOpt = Annotated[Combine, typer.Option(help="Hierarchical combination: soft, topk or hard routing.")]
KOpt = Annotated[int, typer.Option("--k", min=1, help="Branches kept by --combine topk.")]
AggregateOpt = Annotated[Aggregate, typer.Option(help="How a product's images combine: mean, logmean or max.")]
TtaOpt = Annotated[bool, typer.Option(help="Average with horizontally flipped images (needs hflip features).")]
AbstainOpt = Annotated[
    float | None,
    typer.Option(min=0.0, max=1.0, help="Below this confidence answer only down to level 2 or level 1."),
]
AlphaOpt = Annotated[
    str | None,
    typer.Option(
        help="Also score the fused model P ∝ P_flat^a · P_hier^(1-a): a in [0, 1], or 'auto' (tuned on --calibrate)."
    ),
]
CalibrateOpt = Annotated[
    Path | None,
    typer.Option(
        "--calibrate",
        exists=True,
        file_okay=False,
        help="Features to fit each head's temperature (and an 'auto' fused a) on first: the run's training "
        "features (their held-out images are used), or other labelled features not scored.",
    ),
]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per forward pass of the heads.")]


def load_runs(
    runs: list[Path],
    taxonomy: Path | None,
    *,
    combine: Combine,
    k: int,
    batch_size: int,
    only_flat: bool = False,
) -> list[Run]:
    """Load every ``--run``; the first run's taxonomy (or ``--taxonomy``) must fit them all."""
    from hierclass.run import Run
    from hierclass.taxonomy import Taxonomy

    tax = Taxonomy.from_csv(taxonomy) if taxonomy is not None else None
    loaded = []
    for root in runs:
        run = Run.load(root, tax, combine=combine.value, k=k, batch_size=batch_size, only_flat=only_flat)
        tax = run.taxonomy
        loaded.append(run)
    return loaded


def parse_alpha(fused_alpha: str | None) -> float | None:
    """``--fused-alpha``: a weight in [0, 1], None for 'auto' or not given."""
    if fused_alpha is None or fused_alpha.strip().lower() == "auto":
        return None
    try:
        alpha = float(fused_alpha)
    except ValueError:
        raise fail(f"--fused-alpha {fused_alpha!r} is not a number; give a in [0, 1] or 'auto'") from None
    if not 0.0 <= alpha <= 1.0:
        raise fail(f"--fused-alpha {alpha} is outside [0, 1]; give a in [0, 1] or 'auto'")
    return alpha


def build_models(
    runs: list[Run],
    *,
    fused_alpha: str | None,
    calibrate_dir: Path | None,
) -> tuple[dict[str, Classifier], dict[str, Any] | None]:
    """The models to score: each run's, or with several runs, each model's ensemble over the runs.

    ``fused`` is added when ``fused_alpha`` is given (a weight, or 'auto': tuned on ``calibrate_dir``)
    or when a run holds a fitted fusion weight. With ``calibrate_dir``, the run's temperatures (and
    an 'auto' weight) are fitted there first, on the images its heads held out of training when it
    holds the run's training features, and kept in the run.

    Returns:
        The models, and where their temperatures were fitted (None: not fitted).
    """
    from hierclass.inference import EnsembleClassifier, FusedClassifier

    auto = fused_alpha is not None and fused_alpha.strip().lower() == "auto"
    alpha = parse_alpha(fused_alpha)
    if fused_alpha is not None:
        for run in runs:
            if not {"flat", "hierarchical"} <= set(run.models):
                raise fail(f"{run.root}: a fused model needs both the flat and the hierarchical model")
        if auto and calibrate_dir is None:
            raise fail("--fused-alpha auto tunes a on labelled features; pass the training features with --calibrate")
    if calibrate_dir is not None:
        if len(runs) > 1:
            raise fail(
                "--calibrate fits one run; calibrate each run alone first (evaluate --run R --calibrate ...), "
                "then score them together"
            )
        import numpy as np

        from hierclass.featurestore import FeatureStore

        store = FeatureStore.open(calibrate_dir)
        if not (np.asarray(store.leaf) >= 0).any():
            raise fail(f"{calibrate_dir} (--calibrate): no labelled image to calibrate on; pass labelled features")
        run = runs[0]
        if auto or alpha is not None:
            run.models["fused"] = FusedClassifier(run.models["flat"], run.models["hierarchical"], alpha or 0.5)
        record = run.calibrate(store, tune_fused=auto)
        where = "held-out images of the run's training set" if record["rows"] == "holdout" else "labelled images"
        typer.echo(f"calibrating on the {record['n_images']} {where} in {calibrate_dir}")
        for name, settings in (run.calibration() or {}).get("models", {}).items():
            shown = {k: round(v, 4) for k, v in settings.items() if isinstance(v, float)}
            typer.echo(f"calibrated   {name}: {', '.join(f'{k}={v}' for k, v in shown.items())}")
        typer.echo(f"calibration  kept in {run.root / 'run.json'} (evaluate, predict and serve use it)")
    for run in runs:
        if alpha is not None:
            run.models["fused"] = FusedClassifier(run.models["flat"], run.models["hierarchical"], alpha)
    if len(runs) == 1:
        return runs[0].models, (runs[0].calibration() or {}).get("on")
    names = [name for name in runs[0].models if all(name in run.models for run in runs)]
    if not names:
        raise fail(f"the runs {', '.join(str(r.root) for r in runs)} share no model (flat or hierarchical)")
    models = {name: EnsembleClassifier([run.models[name] for run in runs]) for name in names}
    return models, ensemble_calibration(runs)


def ensemble_calibration(runs: list[Run]) -> dict[str, Any] | None:
    """Where the members of an ensemble were calibrated, as one record (None: none of them was)."""
    records = [(run.calibration() or {}).get("on") for run in runs]
    if all(r is None for r in records):
        return None
    if any(r is None for r in records):
        return {"store": "some members only", "rows": "mixed", "n_images": 0}
    rows = {r["rows"] for r in records}
    return {
        "store": ", ".join(r["store"] for r in records),
        "rows": rows.pop() if len(rows) == 1 else "mixed",
        "n_images": sum(r["n_images"] for r in records),
    }


def features_cache_dir(run: Path, data: Path, settings: dict[str, Any] | None = None) -> Path:
    """Where the features of ``--data`` are cached: ``RUN/features/<name>-<key>``.

    The key hashes the source's resolved path, size and modification time (and those of a
    folder's category folders) and the extraction ``settings`` (backbone, weights, input size,
    flipped views), so two sources of the same name never share a cache, and a source that
    changed, or a run retrained on another backbone, gets a fresh one. ``evaluate`` and
    ``predict`` both cache here.
    """
    path = data.resolve()
    parts = [str(path), json.dumps(settings or {}, sort_keys=True, default=str)]
    stats = [path, *sorted(p for p in path.iterdir() if p.is_dir())] if path.is_dir() else [path]
    for p in stats:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    return run / "features" / f"{data.name}-{key}"


def open_stores(
    runs: list[Run],
    models: dict[str, Classifier],
    features: list[Path] | None,
    data: Path | None,
    tta: bool,
    progress: bool = True,
    cache: Path | None = None,
    strict: bool = False,
) -> FeatureStore | FeatureStores:
    """What to score: one feature store, or with several runs, one per run (each run reads its own features).

    ``--features`` is given once (every run reads it) or once per run, in the order of ``--run``.
    """
    features = features or []
    if (not features) == (data is None):
        raise fail("pass exactly one of --features (a feature folder) or --data (a dump to extract features from)")
    if len(features) not in (0, 1, len(runs)):
        raise fail(f"{len(features)} --features for {len(runs)} --run; give one for all, or one per run in order")
    if cache is not None and len(runs) > 1:
        raise fail("--features-cache names one folder; with several --run each run caches its own features")
    picked = [features[min(i, len(features) - 1)] if features else None for i in range(len(runs))]
    if len(runs) == 1:
        only = runs[0]
        return open_features(only.models, only.taxonomy, picked[0], data, only.root, tta, progress, cache, strict)
    from hierclass.inference import FeatureStores

    stores = [
        open_features(run.models, run.taxonomy, path, data, run.root, tta, progress, None, strict)
        for run, path in zip(runs, picked, strict=True)
    ]
    try:
        return FeatureStores(stores)
    except ValueError as e:
        raise fail(str(e)) from None


def open_features(
    models: dict[str, Classifier],
    taxonomy: Taxonomy,
    features: Path | None,
    data: Path | None,
    run: Path,
    tta: bool,
    progress: bool = True,
    cache: Path | None = None,
    strict: bool = False,
) -> FeatureStore:
    """The feature store one run scores: ``--features``, or features of ``--data`` extracted with the
    backbone and preprocessing the run's heads were trained on, cached in ``cache`` (default: see
    :func:`features_cache_dir`)."""
    from hierclass.featurestore import FeatureStore
    from hierclass.run import check_store, features_meta

    if features is not None:
        store = FeatureStore.open(features)
    else:
        from hierclass.features import extract_features

        trained = features_meta(models)
        if not trained.get("backbone"):
            raise fail("the run's checkpoints do not record their backbone; extract features and pass --features")
        size = (trained.get("data_config") or {}).get("input_size")
        settings = {
            "backbone": trained["backbone"],
            "pretrained": trained.get("pretrained", "none"),
            "engine": trained.get("engine", "onnx"),
            "image_size": int(size[-1]) if size else None,
            "hflip": tta,
            **({"top_stages": int(trained["top_stages"])} if trained.get("top_stages") else {}),
        }
        cache = cache or features_cache_dir(run, data, settings)
        typer.echo(f"extracting {data} with {trained['backbone']} into {cache} (reused when run again)")
        store = extract_features(
            data,
            taxonomy,
            settings["backbone"],
            settings["pretrained"],
            cache,
            engine=settings["engine"],
            image_size=settings["image_size"],
            hflip=tta,
            top_stages=settings.get("top_stages", 0),
            progress=progress,
            strict=strict,
        )
    for line in store.meta.get("source_problems", []):
        typer.echo(f"warning: {line}", err=True)
    check_store(store, models, run)
    return store


@command(name="evaluate")
def evaluate_command(
    run: RunDirs,
    out: Annotated[Path, typer.Option(help="The report folder: report.md, report.json and PNG plots.")],
    features: FeaturesOpt = None,
    data: DataOpt = None,
    taxonomy: TaxonomyOpt = None,
    combine: CombineOpt = Combine.soft,
    k: KOpt = 3,
    aggregate: AggregateOpt = Aggregate.mean,
    tta: TtaOpt = False,
    abstain_threshold: AbstainOpt = None,
    fused_alpha: AlphaOpt = None,
    calibrate_dir: CalibrateOpt = None,
    batch_size: BatchOpt = 4096,
    progress: Progress = True,
) -> None:
    """Score the run's flat and hierarchical models on the same labelled images and products.

    Features of ``--data`` are extracted once into ``RUN/features`` and reused when run again.
    """
    check_writable_dir(out, "--out")  # before the work, not after it
    from hierclass.report import evaluate, write_report

    runs = load_runs(run, taxonomy, combine=combine, k=k, batch_size=batch_size)
    models, calibration = build_models(runs, fused_alpha=fused_alpha, calibrate_dir=calibrate_dir)
    store = open_stores(runs, models, features, data, tta, progress)
    report = evaluate(
        models,
        store,  # type: ignore[arg-type]
        how=aggregate.value,
        tta=tta,
        abstain_threshold=abstain_threshold,
        meta={"run": str(run[0]) if len(run) == 1 else [str(r) for r in run]},
        calibration=calibration,
    )
    for warning in report["meta"]["warnings"]:
        typer.echo(f"WARNING: {warning}", err=True)
    md = write_report(report, out)
    for name in report["meta"]["models"]:
        r = report[name]
        typer.echo(
            f"{name:<13} leaf top-1 {r['leaf_top1']:.4f} (products {r['product']['leaf_top1']:.4f})  "
            f"level-1 {r['level1_acc']:.4f}  hF1 {r['hierarchical_f1']:.4f}  "
            f"on {r['n_images']} images / {r['n_products']} products"
        )
    from hierclass.report import verdict_lines

    for line in verdict_lines(report):
        typer.echo(line)
    typer.echo(f"report       {md}")


@command(name="predict")
def predict_command(
    run: RunDirs,
    out: Annotated[
        Path, typer.Option(help="The CSV to write: _id,category_id, one row per _id (path,... per image file).")
    ],
    data: PredictDataOpt = None,
    features: FeaturesOpt = None,
    taxonomy: TaxonomyOpt = None,
    model: Annotated[Model, typer.Option(help="hierarchical (default), flat or fused.")] = Model.hierarchical,
    topk: Annotated[int, typer.Option(min=0, max=50, help="Add the top-K leaves, their names and probabilities.")] = 0,
    combine: CombineOpt = Combine.soft,
    k: KOpt = 3,
    aggregate: AggregateOpt = Aggregate.mean,
    tta: TtaOpt = False,
    abstain_threshold: AbstainOpt = None,
    fused_alpha: Annotated[
        str | None,
        typer.Option(
            help="a of --model fused, in [0, 1], or 'auto' (tuned on --calibrate); "
            "default: the run's fitted weight, else 0.5."
        ),
    ] = None,
    calibrate_dir: CalibrateOpt = None,
    features_cache: Annotated[
        Path | None,
        typer.Option(help="Where --data's features are cached; default RUN/features/<data name>-<content key>."),
    ] = None,
    batch_size: BatchOpt = 4096,
    progress: Progress = True,
    strict: Annotated[
        bool, typer.Option(help="Fail on any problem of the dump instead of predicting what can be read.")
    ] = False,
) -> None:
    """Predict the category of every product of a dump, in Kaggle's submission format.

    A source whose products carry SKUs (see ``hierclass import``) adds a ``sku`` column. Products
    that share an ``_id`` are predicted apart; the first of them gets the row, with a warning. Image
    files (or a folder of them) get one row each, with their ``path`` in place of ``_id`` and a
    ``reason`` column that says why an image that could not be used has no prediction.
    """
    check_writable_file(out, "--out")  # before the work, not after it
    from hierclass.predictor import image_files

    images = image_files(data) if data else None
    data = data[0] if data else None
    if images is not None:
        if features:
            raise fail("pass exactly one of --features (a feature folder) or --data (a dump or images)")
        if len(run) > 1 or tta or calibrate_dir is not None:
            what = "several --run" if len(run) > 1 else "--tta" if tta else "--calibrate"
            raise fail(f"{what} is for dumps and feature folders; predict image files with one --run, without it")
        runs = load_runs(run, taxonomy, combine=combine, k=k, batch_size=batch_size, only_flat=model is Model.flat)
        if model is Model.fused and (fused_alpha is not None or "fused" not in runs[0].models):
            build_models(runs, fused_alpha=fused_alpha or "0.5", calibrate_dir=None)
        if model.value not in runs[0].models:
            raise fail(f"{run[0]}: has no {model.value} model; train it, or pass --model {' or '.join(runs[0].models)}")
        predict_image_files(runs[0], images, out, model.value, topk, abstain_threshold)
        return
    import numpy as np

    from hierclass.inference import predict_store
    from hierclass.report import submission_products

    runs = load_runs(run, taxonomy, combine=combine, k=k, batch_size=batch_size, only_flat=model is Model.flat)
    tax = runs[0].taxonomy
    if topk > tax.n_leaves:
        typer.echo(
            f"warning: --topk {topk} is more than the taxonomy's {tax.n_leaves} leaves; using {tax.n_leaves}", err=True
        )
        topk = tax.n_leaves
    if model is Model.fused and fused_alpha is None and any("fused" not in r.models for r in runs):
        fused_alpha = "0.5"
    models, _ = build_models(
        runs, fused_alpha=fused_alpha if model is Model.fused else None, calibrate_dir=calibrate_dir
    )
    if model.value not in models:
        where = ", ".join(str(r) for r in run)
        raise fail(f"{where}: has no {model.value} model; train it, or pass --model {' or '.join(models)}")
    clf = models[model.value]
    for r in runs:  # each run reads its features for the chosen model only
        r.models = {model.value: r.models[model.value]}
    store = open_stores(runs, {model.value: clf}, features, data, tta, progress, cache=features_cache, strict=strict)
    if not np.asarray(store.valid).any():
        raise fail(
            f"{data or features}: none of its {store.n_images} image(s) could be decoded; nothing to predict from "
            "(check that the pictures are JPEG, PNG or another format Pillow reads)"
        )
    _, products = predict_store(clf, store, how=aggregate.value, tta=tta, k=max(topk, 1))
    skus = None
    if data is not None:
        from hierclass.data import open_source, source_skus

        source = open_source(data, progress=False, taxonomy=tax)
        product_ids, product_rows, skus = source.product_ids, np.arange(len(source)), source_skus(source)
        report = getattr(source, "report", None)
        if report is not None and not report.ok:
            parts = [f"{n} {what}" for n, what in ((report.n_no_images, "document(s) without images"),
                     (report.n_malformed, "malformed document(s)")) if n]  # fmt: skip
            if report.unindexed_bytes:
                parts.append(f"the products in {report.unindexed_bytes} damaged byte(s)")
            if parts:
                typer.echo(
                    f"warning: {data}: {' and '.join(parts)} of the dump could not be read and have no row in {out} "
                    "(see the warnings above)",
                    err=True,
                )
    else:
        product_rows, first = np.unique(store.product_row, return_index=True)
        product_ids = store.product_id[first]
    products, missing, repeated = submission_products(products, product_ids, product_rows)
    if len(repeated):
        named = ", ".join(str(i) for i in repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        typer.echo(
            f"warning: {data or features}: {len(product_ids) - len(products)} product(s) repeat the _id of an "
            f"earlier one (_id {named}); {out} has one row per _id, the prediction for its first product "
            "(give each product its own _id to predict them all)",
            err=True,
        )
    kept = zip(products.ids, products.product_row, strict=True)  # each _id and the source row it kept
    sku_of = None if skus is None else {int(i): skus[r] for i, r in kept}
    write_submission(out, products, tax, topk, abstain_threshold, sku_of)
    note = f" ({missing} without a usable image got the most predicted leaf)" if missing else ""
    typer.echo(f"wrote {len(products)} products to {out} with the {model.value} model{note}")


def predict_image_files(
    run: Run, images: list[Path], out: Path, model: str, topk: int, abstain_threshold: float | None
) -> None:
    """``predict`` on image files: one CSV row per file (see :func:`hierclass.predictor.prediction_rows`)."""
    from hierclass.predictor import write_prediction_csv

    topk = min(topk, run.taxonomy.n_leaves) if run.taxonomy is not None else topk
    answers = run.predict_images(images, model=model, topk=max(topk, 1), abstain_threshold=abstain_threshold)
    write_prediction_csv(out, answers, topk=topk, abstain_threshold=abstain_threshold)
    bad = [a for a in answers if not a.leaves]
    note = (
        f"; {len(bad)} could not be used (see the reason column), e.g. {bad[0].sources[0]}: {bad[0].reason}"
        if bad
        else ""
    )
    typer.echo(f"wrote {len(answers)} images to {out} with the {model} model{note}")


def write_submission(
    out: Path,
    products,
    tax: Taxonomy,
    topk: int,
    abstain_threshold: float | None,
    skus: dict[int, str] | None,
) -> None:
    """The prediction CSV; with ``skus`` (product id -> SKU) a last ``sku`` column, empty where a product has none."""
    from hierclass.report import write_predictions

    if skus is None:
        write_predictions(out, products, tax, topk=topk, abstain_threshold=abstain_threshold)
        return
    import csv

    from hierclass.atomic import atomic_open
    from hierclass.report import submission_rows

    header, rows = submission_rows(products, tax, topk=topk, abstain_threshold=abstain_threshold)
    with atomic_open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*header, "sku"])
        writer.writerows([*row, skus.get(int(row[0])) or ""] for row in rows)
