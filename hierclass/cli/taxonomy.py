"""``hierclass taxonomy stats|show``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hierclass.cli.app import app, command

taxonomy_app = typer.Typer(help="Inspect a taxonomy file (category_names.csv).", no_args_is_help=True)
app.add_typer(taxonomy_app, name="taxonomy")

TaxonomyPath = Annotated[Path, typer.Argument(help="A category_names.csv file.")]


@command(taxonomy_app, name="stats")
def taxonomy_stats(csv: TaxonomyPath) -> None:
    """Print the counts per level and the leaves per branch."""
    from hierclass.taxonomy import Taxonomy

    tax = Taxonomy.from_csv(csv)
    s = tax.stats()
    typer.echo(f"taxonomy     {csv}")
    typer.echo(f"fingerprint  {s['fingerprint']}")
    typer.echo(f"level 1      {s['level1']} branches")
    typer.echo(f"level 2      {s['level2']} nodes ({s['level2_distinct_names']} distinct names)")
    typer.echo(f"leaves       {s['leaves']} ({s['leaf_distinct_names']} distinct names)")
    typer.echo(
        f"leaves per branch  min {s['leaves_per_branch_min']}  median {s['leaves_per_branch_median']:g}  "
        f"max {s['leaves_per_branch_max']}  ({s['single_leaf_branches']} single-leaf branches need no expert)"
    )


@command(taxonomy_app, name="show")
def taxonomy_show(
    csv: TaxonomyPath,
    branch: Annotated[str | None, typer.Option(help="Show only this level-1 branch.")] = None,
) -> None:
    """Print the tree: branches, level-2 nodes and leaves with their category_id."""
    from hierclass.taxonomy import Taxonomy

    tax = Taxonomy.from_csv(csv)
    branches = [tax.branch_index(branch)] if branch is not None else range(tax.n_level1)
    for b in branches:
        leaves = tax.branch_leaves(b)
        typer.echo(f"{tax.level1_names[b]}  [{len(leaves)} leaves]")
        current = None
        for leaf in leaves:
            _, l2, l3 = tax.leaf_path(int(leaf))
            if l2 != current:
                typer.echo(f"  {l2}")
                current = l2
            typer.echo(f"    {l3}  ({tax.leaf_ids[leaf]})")
