"""``hierclass demo``: the whole pipeline on an embedded default, offline, in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hierclass.cli.app import Progress, command, fail
from hierclass.defaults import DEFAULT_BACKBONE, DEFAULT_PRETRAINED

SYNTHETIC_BANNER = (
    "SYNTHETIC DATA: these figures come from generated images of a made-up taxonomy. "
    "They test the pipeline and say nothing about accuracy on real catalogues."
)


FASHION_FILES = ("train.bson", "val.bson", "category_names.csv")


def data_roots() -> list[Path]:
    """Where the shared data is looked for: ``shared/data`` beside the checkout, then beside the working directory."""
    checkout = Path(__file__).resolve().parents[2]  # hierclass/cli/demo.py -> the checkout
    roots = [checkout.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return list(dict.fromkeys(roots))


def find_fashion(roots: list[Path]) -> Path | None:
    """The first ``ROOT/fashion`` folder holding the Fashion dumps and taxonomy, or None."""
    for root in roots:
        folder = root / "fashion"
        if all((folder / f).is_file() for f in FASHION_FILES):
            return folder
    return None


def fashion_subset(src: Path, out: Path, share: float, progress: bool = True) -> Path:
    """A stratified share of a dump's products, written once as a dump of its own (the dump itself if share is 1)."""
    if share >= 1.0:
        return src
    if not out.exists():
        import numpy as np

        from hierclass.data import open_source, products_of, split_products, write_dump

        source = open_source(src, cache_dir=out.parent / "index", progress=progress)
        _, rows = split_products(source.category_ids, val_fraction=share, seed=0)
        write_dump(out, products_of(source, np.sort(rows)))
    return out


@command(name="demo")
def demo(
    train: Annotated[
        Path | None, typer.Option(help="Training dump or catalogue (default: Fashion if present, else synthetic).")
    ] = None,
    val: Annotated[Path | None, typer.Option(help="Validation dump or catalogue (with --train).")] = None,
    taxonomy: Annotated[Path | None, typer.Option(help="category_names.csv (with --train).")] = None,
    out: Annotated[Path, typer.Option(help="Work folder: features, run, report (reused to resume).")] = Path(
        "hierclass-demo"
    ),
    synthetic: Annotated[
        bool, typer.Option("--synthetic", help="Use the synthetic catalogue even if Fashion is present.")
    ] = False,
    image_size: Annotated[int, typer.Option(help="Backbone input size in pixels.")] = 96,
    epochs: Annotated[int, typer.Option(help="Training epochs per head.")] = 10,
    backbone: Annotated[str, typer.Option(help="timm backbone name.")] = DEFAULT_BACKBONE,
    pretrained: Annotated[
        str, typer.Option(help="efficientnet-lite0 (offline), hub, none, or a checkpoint path.")
    ] = DEFAULT_PRETRAINED,
    engine: Annotated[str, typer.Option(help="Feature extraction engine: onnx or torch.")] = "onnx",
    n_train: Annotated[int, typer.Option(help="Synthetic catalogue: training products.")] = 1200,
    n_val: Annotated[int, typer.Option(help="Synthetic catalogue: validation products.")] = 400,
    data_root: Annotated[
        Path | None,
        typer.Option(
            help="Folder holding fashion/ (train.bson, val.bson, category_names.csv); default: shared/data "
            "beside the checkout, then beside the working directory."
        ),
    ] = None,
    fashion_share: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="Share of the Fashion products used (stratified by leaf).")
    ] = 0.25,
    progress: Progress = True,
) -> None:
    """Run features -> router + experts + flat -> report on real Fashion data or a synthetic catalogue."""
    from hierclass.data.synthetic import make_synthetic_catalogue
    from hierclass.pipeline import PipelineConfig, format_table, run_pipeline, summary_rows

    if (train is None) != (val is None) or (train is None) != (taxonomy is None):
        raise fail("give --train, --val and --taxonomy together, or none of them (for the embedded default)")
    label, work = "your data", out / "run"
    if train is None:
        roots = [data_root] if data_root is not None else data_roots()
        fashion = None if synthetic else find_fashion(roots)
        if fashion is None and not synthetic:
            looked = ", ".join(str(r / "fashion") for r in roots)
            if data_root is not None:
                raise typer.BadParameter(f"no {', '.join(FASHION_FILES)} in {looked}", param_hint="--data-root")
            typer.echo(f"Fashion data not found (looked in {looked}); using the synthetic catalogue")
        if fashion is not None:
            typer.echo(f"Fashion data: {fashion}")
            taxonomy, label = fashion / "category_names.csv", "real Fashion catalogue"
            if fashion_share < 1.0:
                label += f" (a stratified {fashion_share:.0%} of its products, to run in minutes)"
            work = out / f"fashion-{fashion_share:g}"  # one work folder per share: features are per dump
            train = fashion_subset(fashion / "train.bson", work / "data" / "train.bson", fashion_share, progress)
            val = fashion_subset(fashion / "val.bson", work / "data" / "val.bson", fashion_share, progress)
        else:
            cat = make_synthetic_catalogue(out / "synthetic-data", n_train=n_train, n_val=n_val)
            train, val, taxonomy, label = cat.train, cat.val, cat.taxonomy, "synthetic"
            work = out / "synthetic"
    typer.echo(f"data: {label} ({train}, {val})")
    if label == "synthetic":
        typer.echo(SYNTHETIC_BANNER)
    config = PipelineConfig(
        backbone=backbone, pretrained=pretrained, image_size=image_size, engine=engine, progress=progress
    )
    config.train.epochs = epochs
    result = run_pipeline(train, val, taxonomy, work, config, report_meta={"data": label})
    typer.echo("")
    typer.echo(f"validation results ({label}; image level except the last column):")
    typer.echo(format_table(summary_rows(result.report)))
    typer.echo(f"report: {result.report_md}")
    if label == "synthetic":
        typer.echo(SYNTHETIC_BANNER)
