"""``hierclass serve``: an HTTP API and a web page that classify product photos with a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hierclass.cli.app import command, fail
from hierclass.cli.evaluate import Combine, CombineOpt, KOpt, Model, TaxonomyOpt
from hierclass.defaults import Engine


@command(name="serve")
def serve_command(
    run: Annotated[
        Path, typer.Option("--run", exists=True, file_okay=False, help="The run directory (RUN/router, experts, flat).")
    ],
    host: Annotated[str, typer.Option(help="The address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port to listen on.")] = 8000,
    topk: Annotated[int, typer.Option(min=1, max=50, help="Categories ranked per answer.")] = 5,
    max_upload_mb: Annotated[
        float, typer.Option(min=0.01, help="The largest upload accepted (all photos of a request), in MB.")
    ] = 10.0,
    max_images: Annotated[int, typer.Option(min=1, max=256, help="The most photos in one request.")] = 16,
    model: Annotated[Model, typer.Option(help="hierarchical (default), flat or fused.")] = Model.hierarchical,
    abstain_threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Below this probability answer only down to level 2 or level 1."),
    ] = None,
    engine: Annotated[
        Engine, typer.Option(help="What runs the backbone: onnx (exported once into RUN/onnx) or torch.")
    ] = Engine.onnx,  # fmt: skip
    taxonomy: TaxonomyOpt = None,
    combine: CombineOpt = Combine.soft,
    k: KOpt = 3,
) -> None:
    """Serve a run: POST /predict (multipart field 'image'), GET / (a page to drop photos on), /model, /health.

    The run is loaded once, at start; its calibration (``run.json``) is applied.
    """
    from hierclass.run import Run
    from hierclass.server import ServeConfig, serve
    from hierclass.taxonomy import Taxonomy

    tax = Taxonomy.from_csv(taxonomy) if taxonomy is not None else None
    loaded = Run.load(run, tax, combine=combine.value, k=k, only_flat=model is Model.flat)
    if model is Model.fused and "fused" not in loaded.models and {"flat", "hierarchical"} <= set(loaded.models):
        from hierclass.inference import FusedClassifier

        loaded.models["fused"] = FusedClassifier(loaded.models["flat"], loaded.models["hierarchical"], 0.5)  # type: ignore[arg-type]
    if model.value not in loaded.models:
        raise fail(f"{run}: has no {model.value} model; train it, or pass --model {' or '.join(loaded.models)}")
    config = ServeConfig(
        topk=topk, max_upload_mb=max_upload_mb, max_images=max_images, abstain_threshold=abstain_threshold
    )
    typer.echo(f"loading {run} ({loaded.spec.describe()}) ...")

    def announce(url: str) -> None:
        typer.echo(f"serving the {model.value} model of {run} on {url} (Ctrl-C stops)")

    serve(loaded, config, host=host, port=port, model=model.value, engine=engine.value, announce=announce)
