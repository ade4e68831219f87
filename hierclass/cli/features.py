"""``hierclass extract-features``: run a frozen backbone once over a dump into a feature folder (or one
shard of it, ``--shard I/N``); ``hierclass merge-features`` joins the shards into one folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from hierclass.cli.app import Progress, command
from hierclass.defaults import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, Engine


@command(name="extract-features")
def extract_features_command(
    data: Annotated[
        Path, typer.Option(exists=True, help="The image source: a .bson dump, a .csv catalogue or a folder.")
    ],
    taxonomy: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The category_names.csv.")],
    out: Annotated[Path, typer.Option(help="The feature folder; rerun the same command to resume it.")],
    backbone: Annotated[str, typer.Option(help="A timm model name.")] = DEFAULT_BACKBONE,
    pretrained: Annotated[
        str, typer.Option(help="hub, none, efficientnet-lite0 (offline ImageNet weights) or a checkpoint path.")
    ] = DEFAULT_PRETRAINED,
    engine: Annotated[Engine, typer.Option(help="onnx (fast on CPU) or torch.")] = Engine.onnx,
    image_size: Annotated[
        int | None, typer.Option(min=16, help="Square input size instead of the model's (e.g. 128).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader processes decoding images.")] = 0,
    hflip: Annotated[
        bool, typer.Option(help="Also store features of flipped images (test-time augmentation).")
    ] = False,
    top_stages: Annotated[
        int,
        typer.Option(
            min=0,
            help="0: pooled features. N: the map below the backbone's last N stages, for models that train those "
            "stages (CNN tops; about C*H*W*2 bytes per image).",
        ),
    ] = 0,
    progress: Progress = True,
    strict: Annotated[
        bool, typer.Option(help="Fail on any problem of the source instead of skipping and reporting it.")
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: extract only shard I of N (0-based) into --out, e.g. one per machine; join the N folders "
            "with merge-features. Under torchrun each process takes its own shard (OUT/shard-I-of-N).",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Where the torch engine runs: cpu, cuda or cuda:N (default: the GPU if any).")
    ] = None,
) -> None:
    """Extract backbone features of every image (pooled, or trunk maps with --top-stages), resumably, into a
    feature folder."""
    from hierclass.features import extract_features, parse_shard
    from hierclass.outputs import check_writable_dir

    parts = parse_shard(shard) if shard is not None else None
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if parts is None and world > 1:  # torchrun: one shard per process, each on its own GPU
        parts = (int(os.environ.get("RANK", "0")), world)
        out = out / f"shard-{parts[0]}-of-{world}"
        if engine == Engine.torch and device is None:
            import torch

            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    check_writable_dir(out, "--out")
    store = extract_features(
        data,
        taxonomy,
        backbone,
        pretrained,
        out,
        engine=engine,
        image_size=image_size,
        batch_size=batch_size,
        workers=workers,
        hflip=hflip,
        top_stages=top_stages,
        progress=progress,
        strict=strict,
        shard=parts,
        device=device,
    )
    for line in store.meta.get("source_problems", []):
        typer.echo(f"warning: {line}", err=True)
    run = store.meta.get("last_run", {})
    size = store.meta["data_config"]["input_size"][-1]
    typer.echo(f"features     {out}  ({store.meta['backbone']}, {store.meta['pretrained']}, {size} px)")
    typer.echo(f"images       {store.n_images}  ({int(store.valid.sum())} ok, {store.meta['n_bad']} bad)")
    shape = store.meta.get("map_shape")
    what = f"{store.dim}" + (
        f" (maps {'x'.join(map(str, shape))}, top stages {store.meta['top_stages']})" if shape else ""
    )
    typer.echo(f"dim          {what}  views {', '.join(store.meta['views'])}")
    if run.get("already_complete"):
        typer.echo("this run     nothing to do: the folder was complete")
    else:
        resumed = " (resumed)" if run.get("resumed") else ""
        typer.echo(
            f"this run     {run['images'] + run['bad']} images in {run['seconds']:.1f} s, "
            f"{run['images_per_s']:.1f} images/s{resumed}, engine {store.meta['engine']}"
        )
    if parts is not None:
        typer.echo(f"shard        {parts[0]}/{parts[1]}: rows {store.meta['shard']['rows']}; join all {parts[1]} "
                   "with hierclass merge-features")  # fmt: skip


@command(name="merge-features")
def merge_features_command(
    shards: Annotated[list[Path], typer.Argument(exists=True, file_okay=False, help="The N shard folders.")],
    out: Annotated[Path, typer.Option(help="The merged feature folder.")],
) -> None:
    """Join the N shards of one extraction (extract-features --shard I/N) into one feature folder, the same as
    one unsharded run gives."""
    from hierclass.features import merge_features
    from hierclass.outputs import check_writable_dir

    check_writable_dir(out, "--out")
    store = merge_features(list(shards), out)
    typer.echo(f"features     {out}  ({len(shards)} shards, {store.n_images} images, {store.meta['n_bad']} bad)")
