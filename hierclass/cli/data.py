"""``hierclass index``, ``import`` and ``split``: index a dump, turn image files into a dump, split a dump."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hierclass.cli.app import Progress, command, fail
from hierclass.errors import DumpError


@command(name="index")
def index_command(
    dump: Annotated[Path, typer.Argument(help="A Cdiscount-format .bson dump.")],
    taxonomy: Annotated[
        Path | None, typer.Option(help="A category_names.csv: also count categories missing from it.")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Keep the index file here instead of beside the dump.")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first problem instead of skipping and reporting.")] = False,
    progress: Progress = True,
) -> None:
    """Build (or reuse) the offset index of a dump and print what it holds."""
    import numpy as np

    from hierclass.data import BsonDump, open_source
    from hierclass.taxonomy import Taxonomy

    tax = Taxonomy.from_csv(taxonomy) if taxonomy is not None else None
    if dump.suffix.lower() != ".bson":
        raise DumpError(f"{dump}: not a .bson dump; `hierclass import` turns image files into one")
    source = open_source(dump, cache_dir=cache_dir, progress=progress, strict=strict)
    assert isinstance(source, BsonDump)
    r = source.report
    for line in r.problems():
        typer.echo(f"warning: {line}", err=True)
    if tax is not None:
        known = tax.encode(source.category_ids, unknown=-1) >= 0
        unknown = ~known & (source.category_ids >= 0)
        missing = np.unique(source.category_ids[unknown])
        if len(missing):
            first = int(np.flatnonzero(unknown)[0])
            message = (
                f"{dump}:{int(source.index.offset[first])}: category_id {int(source.category_ids[first])} is not in "
                f"{taxonomy}; {int(unknown.sum())} product(s) in {len(missing)} unknown categories (kept, encoded as "
                "-1); use the taxonomy the dump was labelled with"
            )
            if strict:
                raise DumpError(message)
            typer.echo(f"warning: {message}", err=True)
    typer.echo(f"dump         {dump} ({r.size_bytes:,} bytes)")
    typer.echo(f"index        {r.index_file or 'not saved (no writable folder)'}{' (reused)' if r.reused else ''}")
    typer.echo(f"products     {r.n_products:,}")
    typer.echo(f"images       {r.n_images:,}")
    typer.echo("images/product  " + "  ".join(f"{k}: {v:,}" for k, v in sorted(r.images_per_product.items())))
    typer.echo(
        f"categories   {r.n_categories:,} seen"
        + (f" ({r.n_without_category:,} products unlabelled)" if r.n_without_category else "")
    )
    if tax is not None:
        typer.echo(f"missing from taxonomy  {len(missing)} categories, {int(unknown.sum()):,} products")
    if not r.ok:
        typer.echo(
            f"skipped      {r.n_no_images:,} without images, {r.n_malformed:,} malformed; "
            f"{r.unindexed_bytes:,} bytes not indexed"
        )


@command(name="import")
def import_command(
    src: Annotated[
        Path,
        typer.Argument(
            help="A CSV (path,category_id[,product_id or SKU]) or a folder per category (category_id or level-3 name)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The .bson dump to write.")],
    taxonomy: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="A category_names.csv: lets folders be named by category name."),
    ] = None,
    progress: Progress = True,
) -> None:
    """Write image files as a Cdiscount-format BSON dump (JPEGs copied, other formats re-encoded).

    SKU product ids are kept in each document's ``sku`` field; the ``_id``s are then the product rows.
    """
    from hierclass.data import import_catalogue, open_source
    from hierclass.taxonomy import Taxonomy

    if out.suffix.lower() != ".bson":
        raise DumpError(f"{out}: the output must be a .bson file; name it e.g. {out.with_suffix('.bson').name}")
    tax = Taxonomy.from_csv(taxonomy) if taxonomy is not None else None
    source = open_source(src, progress=progress, taxonomy=tax)
    for line in getattr(source, "problems", list)():
        typer.echo(f"warning: {line}", err=True)
    counts = import_catalogue(source, out, progress=progress)
    if counts["bad_images"] or counts["skipped_products"]:
        typer.echo(
            f"warning: {src}: {counts['bad_images']} undecodable image(s) skipped, {counts['skipped_products']} "
            "product(s) left without images skipped",
            err=True,
        )
    typer.echo(f"wrote {out}: {counts['products']:,} products, {counts['images']:,} images")


@command(name="split")
def split_command(
    dump: Annotated[Path, typer.Argument(help="A labelled Cdiscount-format .bson dump.")],
    out: Annotated[Path, typer.Option("--out", help="The folder for train.bson and val.bson.")],
    val_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of each leaf's products sent to val.bson, in [0, 1).")
    ] = 0.15,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same split).")] = 0,
    cache_dir: Annotated[Path | None, typer.Option(help="Keep the index file here instead of beside the dump.")] = None,
    progress: Progress = True,
) -> None:
    """Split a dump into OUT/train.bson and OUT/val.bson, stratified by leaf; a product is never in both."""
    from hierclass.data import split_dump

    if val_fraction >= 1.0:
        raise fail(f"--val-fraction {val_fraction:g} keeps no products for training; give a value in [0, 1)")
    counts = split_dump(dump, out, val_fraction, seed, cache_dir=cache_dir, progress=progress)
    for name in ("train", "val"):
        typer.echo(
            f"{name:<6} {out / (name + '.bson')}: {counts[name]:,} products, {counts[name + '_images']:,} images"
        )
