"""``hierclass train-router | train-experts | train-flat``: train a head on cached features.

One run directory holds an experiment's three heads: ``RUN/router``, ``RUN/experts``, ``RUN/flat``.
"""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from hierclass.cli.app import command, fail
from hierclass.engine import TrainConfig, train_head
from hierclass.featurestore import FeatureStore
from hierclass.taxonomy import Taxonomy


class ClassBalance(str, Enum):
    none = "none"
    loss = "loss"
    sampler = "sampler"


_defaults = TrainConfig()
_DEFAULT_BALANCE = ClassBalance(_defaults.class_balance)
FeaturesDir = Annotated[
    Path, typer.Option("--train", exists=True, file_okay=False, help="Training features (a feature store directory).")
]
ValDir = Annotated[
    Path | None,
    typer.Option(
        "--val", exists=True, file_okay=False, help="Validation features; default: 10% of the training products."
    ),
]
TaxonomyCsv = Annotated[
    Path, typer.Option("--taxonomy", exists=True, dir_okay=False, help="The category_names.csv of the labels.")
]
RunDir = Annotated[Path, typer.Option("--run", help="Run directory; the head goes to RUN/<router|experts|flat>.")]
Epochs = Annotated[int, typer.Option(min=1, help="Passes over the training images.")]
Lr = Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW; warm-up then cosine).")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per optimiser step.")]
Hidden = Annotated[int | None, typer.Option(min=1, help="Hidden width of an MLP head; default: linear.")]
Dropout = Annotated[float, typer.Option(min=0.0, max=0.99, help="Dropout in the head.")]
Smoothing = Annotated[float, typer.Option(min=0.0, max=0.99, help="Label smoothing.")]
Balance = Annotated[ClassBalance, typer.Option(help="Class balancing: none, loss (weighted) or sampler.")]
Patience = Annotated[int, typer.Option(min=0, help="Epochs without better val accuracy before stopping; 0: never.")]
Seed = Annotated[int, typer.Option(help="Random seed (same seed, same weights).")]
Device = Annotated[str, typer.Option(help="cpu or cuda.")]


def _train(
    kind: str, train: Path, val: Path | None, taxonomy: Path, run: Path, branch: str | None, **opts: Any
) -> None:
    opts["class_balance"] = opts["class_balance"].value
    try:
        config = TrainConfig(**opts)
        config.validate()
    except ValueError as e:
        raise fail(str(e)) from None
    tax = Taxonomy.from_csv(taxonomy)
    train_store = FeatureStore.open(train)
    val_store = FeatureStore.open(val) if val is not None else None
    if val_store is None:
        typer.echo("no --val: validating on a deterministic 10% of the training products (all images of a product)")
    out_dir = run / kind
    m = train_head(kind, train_store, val_store, tax, config, out_dir, branch=branch)
    what = kind + (f" (branch {branch!r})" if branch else "")
    typer.echo(
        f"{what}: best epoch {m['best_epoch']}/{m['epochs_run']}"
        f"{' (stopped early)' if m['stopped_early'] else ''}, val acc {m['val_acc']:.4f}, "
        f"val loss {m['val_loss']:.4f}, {m['seconds']:.1f} s, {m['n_train']} train / {m['n_val']} val images"
    )
    typer.echo(f"saved {out_dir}")


def _train_command(kind: str, doc: str) -> None:
    """Register ``hierclass train-KIND``; the three commands share every option but --branch and --expert-other
    (experts only)."""

    def train_cmd(
        train: FeaturesDir,
        taxonomy: TaxonomyCsv,
        run: RunDir,
        val: ValDir = None,
        branch: Annotated[
            str | None, typer.Option(help="Retrain only this level-1 branch's expert inside RUN/experts.")
        ] = None,
        expert_other: Annotated[
            bool,
            typer.Option(
                "--expert-other",
                help="Every expert also learns an 'other' class from the other branches' images, so routing "
                "mistakes can be recovered at inference (costs about a flat head per step).",
            ),
        ] = _defaults.expert_other,
        epochs: Epochs = _defaults.epochs,
        lr: Lr = _defaults.lr,
        batch_size: BatchSize = _defaults.batch_size,
        hidden: Hidden = _defaults.hidden,
        dropout: Dropout = _defaults.dropout,
        label_smoothing: Smoothing = _defaults.label_smoothing,
        class_balance: Balance = _DEFAULT_BALANCE,
        patience: Patience = _defaults.patience,
        seed: Seed = _defaults.seed,
        device: Device = _defaults.device,
    ) -> None:
        opts = {k: v for k, v in locals().items() if k != "kind"}  # locals() holds the closure's kind too
        head = [opts.pop(k) for k in ("train", "val", "taxonomy", "run", "branch")]
        _train(kind, *head, **opts)

    train_cmd.__doc__ = doc
    train_cmd.__name__ = f"train_{kind}"
    # typer reads this signature: hide --branch and --expert-other where they mean nothing (eval_str: resolved
    # annotations); the hidden ones keep their defaults.
    sig = inspect.signature(train_cmd, eval_str=True)
    keep = [p for p in sig.parameters.values() if kind == "experts" or p.name not in ("branch", "expert_other")]
    train_cmd.__signature__ = sig.replace(parameters=keep)  # type: ignore[attr-defined]
    command(name=f"train-{kind}")(train_cmd)


_train_command("router", "Train the router (level-1 branches) into RUN/router.")
_train_command("experts", "Train the experts (one per branch, packed) into RUN/experts, or one expert with --branch.")
_train_command("flat", "Train the flat baseline (all leaves) into RUN/flat.")
