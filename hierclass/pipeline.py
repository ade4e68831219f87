"""The whole frozen-backbone pipeline as one function: features -> router, experts, flat -> report.

This is what ``hierclass demo`` and the experiment scripts run; each stage is also a CLI
command of its own (``extract-features``, ``train-router``, ``train-experts``, ``train-flat``,
``evaluate``). Stages resume: finished feature stores and trained heads in ``work_dir`` are
reused, so a killed run picks up where it stopped.

Layout of ``work_dir``::

    features/train, features/val   feature stores (hierclass.featurestore)
    run/router, run/experts, run/flat   checkpoints
    report/                        report.md, report.json, plots
    timings.json                   seconds per stage (this invocation; reused stages ~0)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hierclass.checkpoint import read_meta
from hierclass.engine import TrainConfig, train_head
from hierclass.errors import HierclassError
from hierclass.features import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, extract_features
from hierclass.featurestore import FeatureStore, write_json_atomic
from hierclass.inference import FlatClassifier, FusedClassifier, HierarchicalClassifier
from hierclass.report import evaluate, write_report
from hierclass.run import Run, calibrate, calibration_record, training_holdout
from hierclass.taxonomy import Taxonomy

KINDS = ("router", "experts", "flat")


@dataclass
class PipelineConfig:
    """Settings of a whole run. Training settings can differ per head kind."""

    backbone: str = DEFAULT_BACKBONE  # any timm model name
    pretrained: str = DEFAULT_PRETRAINED  # "efficientnet-lite0" (offline ImageNet), "hub", "none" or a path
    image_size: int | None = 128  # backbone input size; None = the model's own (224 for lite0)
    engine: str = "onnx"  # "onnx" (fast on CPU) or "torch"
    extract_batch_size: int = 64
    workers: int = 0  # DataLoader workers for JPEG decoding
    hflip: bool = False  # also extract features of horizontally flipped images
    tta: bool = False  # evaluate on the mean of both views (needs hflip)
    train: TrainConfig = field(default_factory=TrainConfig)  # for every head ...
    per_kind: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # ... with overrides, e.g. {"experts": {"hidden": 256}}
    combine: str = "soft"  # hierarchical inference: "soft", "topk" or "hard"
    fuse: bool = True  # also report flat x two-stage fusion, fitted on the train holdout (on val if there is none)
    progress: bool | None = None  # progress bars (on stderr); None: when stderr is a terminal

    def train_config(self, kind: str) -> TrainConfig:
        bars = {"progress": self.progress} if self.train.progress is None else {}
        return replace(self.train, **bars, **self.per_kind.get(kind, {}))


@dataclass
class PipelineResult:
    report: dict[str, Any]
    report_md: Path
    timings: dict[str, float]
    work_dir: Path


def run_pipeline(
    train_data: str | Path,
    val_data: str | Path,
    taxonomy: Taxonomy | str | Path,
    work_dir: str | Path,
    config: PipelineConfig | None = None,
    log: Callable[[str], None] = print,
    report_meta: dict[str, Any] | None = None,
    features_dir: str | Path | None = None,
) -> PipelineResult:
    """Extract features, train router + experts + flat, and write the flat-vs-hierarchical report.

    Args:
        train_data, val_data: dumps or image catalogues (anything ``hierclass.data.open_source`` reads).
        taxonomy: a Taxonomy or the path of its category_names.csv.
        work_dir: where features, checkpoints and the report go (reused to resume).
        config: the settings (defaults: offline EfficientNet-Lite0 at 128 px, linear heads).
        log: where stage messages go.
        report_meta: extra fields for the report's ``meta`` (e.g. ``{"data": "synthetic"}``).
        features_dir: where the feature stores go (default ``work_dir/features``); runs with
            other head settings can share one.
    """
    config = config or PipelineConfig()
    if config.tta and not config.hflip:
        raise ValueError("tta needs hflip: the flipped view must be extracted to average over it")
    tax = taxonomy if isinstance(taxonomy, Taxonomy) else Taxonomy.from_csv(taxonomy)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    features_root = Path(features_dir) if features_dir is not None else work / "features"

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        log(f"[{name}] ...")
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
        log(f"[{name}] done in {timings[name]:.1f} s")
        return out

    stores: dict[str, FeatureStore] = {}
    for split, data in (("train", train_data), ("val", val_data)):
        stores[split] = stage(
            f"features {split}",
            lambda data=data, split=split: extract_features(
                data,
                tax,
                config.backbone,
                config.pretrained,
                features_root / split,
                engine=config.engine,
                image_size=config.image_size,
                batch_size=config.extract_batch_size,
                workers=config.workers,
                hflip=config.hflip,
                progress=sys.stderr.isatty() if config.progress is None else config.progress,
            ),
        )
    run = work / "run"
    run_folder = Run(run)
    run_folder.adopt_taxonomy(tax)
    for kind in KINDS:
        if (run / kind / "meta.json").is_file():
            check_reusable(run / kind, config.train_config(kind))
            log(f"[train {kind}] reusing {run / kind} (delete it to retrain)")
            timings[f"train {kind}"] = 0.0
            continue
        train_config = config.train_config(kind)
        metrics = stage(
            f"train {kind}",
            lambda kind=kind, c=train_config: train_head(
                kind, stores["train"], stores["val"], tax, c, run / kind, echo=log
            ),
        )
        run_folder.record_head(  # as the train-* commands do
            kind,
            {"train": str(stores["train"].root), "val": str(stores["val"].root), "config": train_config.to_dict(),
             "metrics": metrics},
        )  # fmt: skip

    def score() -> dict[str, Any]:
        models: dict[str, Any] = {
            "flat": FlatClassifier.from_run(run, tax),
            "hierarchical": HierarchicalClassifier.from_run(run, tax, combine=config.combine),
        }
        calibration = None
        if config.fuse:
            hier = HierarchicalClassifier.from_run(run, tax, combine=config.combine)
            models["hierarchical_calibrated"] = hier
            models["fused"] = FusedClassifier(FlatClassifier.from_run(run, tax), hier)
            calibrated = {k: models[k] for k in ("hierarchical_calibrated", "fused")}
            # on the images the heads held out of training: neither fitted on nor scored
            held = training_holdout(stores["train"], calibrated)
            store = stores["train"] if held is not None else stores["val"]
            calibrate(calibrated, store, rows=held)
            calibration = calibration_record(store, held)
        meta = {"pipeline": pipeline_meta(config, run), **(report_meta or {})}
        report = evaluate(models, stores["val"], tta=config.tta, meta=meta, calibration=calibration)
        for warning in report["meta"]["warnings"]:
            log(f"WARNING: {warning}")
        return report

    report = stage("evaluate", score)
    report["meta"]["timings_s"] = timings
    md = write_report(report, work / "report")
    write_json_atomic(work / "timings.json", timings)
    return PipelineResult(report, md, timings, work)


def check_reusable(head_dir: Path, train: TrainConfig) -> None:
    """Refuse to reuse a trained head whose shape differs from what the config asks for."""
    head = read_meta(head_dir)["head"]
    wanted = {"hidden": train.hidden}
    if head.get("kind") == "experts":
        wanted["other"] = train.expert_other
    saved = {key: head.get(key, False if key == "other" else None) for key in wanted}
    if saved != wanted:
        raise HierclassError(
            f"{head_dir}: holds a head trained with {saved}, the config asks for {wanted}; "
            "delete that folder to retrain it, or use another work folder"
        )


def pipeline_meta(config: PipelineConfig, run: Path) -> dict[str, Any]:
    return {
        "backbone": config.backbone,
        "pretrained": config.pretrained,
        "image_size": config.image_size,
        "engine": config.engine,
        "combine": config.combine,
        "tta": config.tta,
        "train": {kind: asdict(config.train_config(kind)) for kind in KINDS},
        "heads": {kind: read_meta(run / kind).get("head") for kind in KINDS},
    }


def summary_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per model: image-level leaf top-1, level-1, level-2, severity, product-level leaf top-1, and
    the image-level verdict against flat (difference in points, 95% interval, McNemar p)."""
    rows = [("model", "leaf top-1", "level-1", "level-2", "mistake severity", "product top-1", "vs flat (images)")]
    for name in report["meta"]["models"]:
        m = report[name]
        v = m.get("vs_flat")
        if v is None:
            verdict = "baseline"
        elif v["diff"] is None:
            verdict = "–"
        else:
            verdict = (
                f"{100 * v['diff']:+.2f} pts [{100 * v['ci_low']:+.2f}, {100 * v['ci_high']:+.2f}] "
                f"p={v['mcnemar_p']:.2g}: {v['verdict']}"
            )
        rows.append(
            (
                name,
                _num(m["leaf_top1"]),
                _num(m["level1_acc"]),
                _num(m["level2_acc"]),
                _num(m["mistake_severity"], 3),  # None when the model makes no mistake
                _num(m["product"]["leaf_top1"]),
                verdict,
            )
        )
    return rows


def _num(value: float | None, digits: int = 4) -> str:
    """A figure of the summary table; "–" for one that cannot be computed (``None`` in report.json)."""
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
