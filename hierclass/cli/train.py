"""``hierclass train-router | train-experts | train-flat``: train a head on cached features, or a whole CNN on images.

``--train`` is a feature folder (``extract-features``), or an image source (a ``.bson`` dump, a
``.csv`` catalogue or a folder of category folders): the CNN is then fine-tuned from the pixels
(:func:`hierclass.engine.train_head`). Under ``torchrun`` every process runs the command and
rank 0 alone writes. One run directory holds an experiment's three heads: ``RUN/router``, ``RUN/experts``, ``RUN/flat``,
with a copy of their taxonomy and a manifest (:class:`hierclass.run.Run`). Every field of
:class:`~hierclass.config.TrainConfig` is an option; ``--config FILE`` reads them from a TOML
file, and options given on the command line override the file.
"""

from __future__ import annotations

import inspect
import os
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from hierclass.cli.app import command, fail
from hierclass.config import (
    AMP_MODES,
    BN_MODES,
    CLASS_BALANCE,
    INIT_FROM,
    SOLVERS,
    TrainConfig,
    read_train_config,
    train_config_fields,
)
from hierclass.errors import HierclassError
from hierclass.run import Run
from hierclass.taxonomy import Taxonomy

Solver = Enum("Solver", {s: s for s in SOLVERS}, type=str)  # type: ignore[misc]
ClassBalance = Enum("ClassBalance", {s: s for s in CLASS_BALANCE}, type=str)  # type: ignore[misc]
BnMode = Enum("BnMode", {s: s for s in BN_MODES}, type=str)  # type: ignore[misc]
InitFrom = Enum("InitFrom", {s: s for s in INIT_FROM}, type=str)  # type: ignore[misc]
AmpMode = Enum("AmpMode", {s: s for s in AMP_MODES}, type=str)  # type: ignore[misc]
_CHOICES: dict[str, type] = {
    "solver": Solver,
    "class_balance": ClassBalance,
    "bn": BnMode,
    "init_from": InitFrom,
    "amp": AmpMode,
}
_OWN_OPTIONS = ("progress", "expert_other")  # declared by hand below

FeaturesDir = Annotated[
    Path,
    typer.Option(
        "--train",
        exists=True,
        help="Training features (a feature folder), or images (a .bson dump, a .csv catalogue or a folder of "
        "category folders) to fine-tune the CNN on.",
    ),
]
ValDir = Annotated[
    Path | None,
    typer.Option(
        "--val",
        exists=True,
        help="Features (or images, with images to --train) to report the accuracy on; never used to choose anything.",
    ),
]
TaxonomyCsv = Annotated[
    Path | None,
    typer.Option(
        "--taxonomy",
        exists=True,
        dir_okay=False,
        help="The category_names.csv of the labels; default: the run's copy, else the one the features were made with.",
    ),
]
RunDir = Annotated[
    Path,
    typer.Option(
        "--run",
        "--run-dir",
        help="Run directory; the head goes to RUN/<router|experts|flat>. --run-dir is the same option, for "
        "torchrun, whose own parser takes --run as its --run-path.",
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", exists=True, dir_okay=False, help="A TOML file of training options (the option names)."),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a head the run already holds.")]
Progress = Annotated[
    bool | None, typer.Option("--progress/--no-progress", help="Progress bars (default: when on a terminal).")
]


def _option_type(name: str, annotation: Any) -> Any:
    if name in _CHOICES:
        return _CHOICES[name]
    if name == "c_grid":
        return str
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def config_parameters() -> list[inspect.Parameter]:
    """One keyword option per TrainConfig field, defaulting to None (= not given: the file's, else the default)."""
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for name, field in train_config_fields().items():
        if name in _OWN_OPTIONS:
            continue
        base = _option_type(name, hints[name])
        flag = "--" + name.replace("_", "-")
        decl = f"{flag}/--no-{name.replace('_', '-')}" if base is bool else flag
        default = field.default
        shown = ",".join(f"{v:g}" for v in default) if name == "c_grid" else default
        help_text = field.metadata["help"] + ("" if default is None else f" (default: {shown})")
        option = typer.Option(decl, help=help_text, show_default=False, rich_help_panel="Training options")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[base | None, option]))  # fmt: skip
    return params


def build_config(given: dict[str, Any], config_file: Path | None) -> TrainConfig:
    """TrainConfig from the file's options overridden by those given on the command line (None: not given)."""
    opts = {k: (v.value if isinstance(v, Enum) else v) for k, v in given.items() if v is not None}
    if "c_grid" in opts:
        try:
            opts["c_grid"] = tuple(float(v) for v in str(opts["c_grid"]).split(",") if v.strip())
        except ValueError:
            raise fail(f"--c-grid {given['c_grid']!r}: expected comma-separated numbers, e.g. 0.01,0.1,1") from None
    if opts.get("hidden") == 0:
        opts["hidden"] = None  # --hidden 0: a linear head, overriding a file's hidden
    merged = {**(read_train_config(config_file) if config_file is not None else {}), **opts}
    try:
        config = TrainConfig(**merged)
        config.validate()
    except (TypeError, ValueError) as e:
        raise fail(str(e)) from None
    return config


def training_taxonomy(taxonomy: Path | None, run: Run, store_meta: dict[str, Any], train: Path) -> Taxonomy:
    """``--taxonomy``, else the run's copy, else the file the feature store was labelled with."""
    if taxonomy is not None:
        return Taxonomy.from_csv(taxonomy)
    copy = run.taxonomy_copy()
    if copy is not None:
        return copy
    source = store_meta.get("taxonomy_source")
    if source and Path(source).is_file():
        return Taxonomy.from_csv(source)
    if not store_meta:
        raise HierclassError(f"{train}: images need the taxonomy of their labels; pass --taxonomy category_names.csv")
    raise HierclassError(
        f"{train}: the taxonomy these features were labelled with ({source or 'not recorded'}) is not there "
        "and the run has none; pass --taxonomy"
    )


def is_feature_folder(path: Path) -> bool:
    """Whether ``--train`` / ``--val`` names a feature folder (else an image source to fine-tune on)."""
    return path.is_dir() and (path / "meta.json").is_file()


def _train(
    kind: str,
    train: Path,
    val: Path | None,
    taxonomy: Path | None,
    run_dir: Path,
    branch: str | None,
    config_file: Path | None,
    overwrite: bool,
    **given: Any,
) -> None:
    config = build_config(given, config_file)
    from hierclass.outputs import check_writable_dir

    check_writable_dir(run_dir / kind, "--run")  # before the work, not after it
    main = int(os.environ.get("RANK", "0") or 0) == 0  # under torchrun, rank 0 alone writes and prints
    from hierclass.engine import train_head

    run = Run(run_dir)
    if is_feature_folder(train):
        from hierclass.featurestore import FeatureStore

        train_data: Any = FeatureStore.open(train)
        val_data: Any = FeatureStore.open(val) if val is not None else None
        tax = training_taxonomy(taxonomy, run, train_data.meta, train)
        train_data.check_taxonomy(tax.fingerprint)
    else:
        from hierclass.data.training import ImageRows

        tax = training_taxonomy(taxonomy, run, {}, train)
        train_data = ImageRows.open(train, tax, progress=main)
        val_data = ImageRows.open(val, tax, progress=main) if val is not None else None
        if main:
            for line in train_data.problems:
                typer.echo(f"warning: {line}", err=True)
    if main:
        run.adopt_taxonomy(tax)
    out_dir = run.head_dir(kind)
    m = train_head(
        kind, train_data, val_data, tax, config, out_dir, branch=branch, overwrite=overwrite,
        echo=lambda line: typer.echo(line, err=True),
    )  # fmt: skip
    if not main:
        return
    run.record_head(
        kind if branch is None else f"{kind}[{branch}]",
        {"train": str(train), "val": str(val) if val else None, "config": config.to_dict(), "metrics": m},
    )
    what = kind + (f" (branch {branch!r})" if branch else "")
    if m["solver"] == "lbfgs":
        chose = f"L-BFGS, C={m['c']:g} chosen on the holdout"
    else:
        stop = " (stopped early)" if m["stopped_early"] else ""
        chose = f"AdamW, best epoch {m['best_epoch']}/{m['epochs']}{stop} on the holdout"
    scores = [f"holdout acc {m['holdout_acc']:.4f}"] if "holdout_acc" in m else []
    if "val_acc" in m:
        scores.append(f"val acc {m['val_acc']:.4f}, val loss {m['val_loss']:.4f}")
    typer.echo(
        f"{what}: {chose}; {', '.join(scores) or 'nothing scored'}; {m['seconds']:.1f} s, "
        f"{m['n_train']} train / {m['n_holdout']} holdout / {m['n_val']} val images"
    )
    typer.echo(f"saved {out_dir}")


def _train_command(kind: str, doc: str) -> None:
    """Register ``hierclass train-KIND``; the three share every option but --branch and --expert-other."""

    def train_cmd(
        train: FeaturesDir,
        run: RunDir,
        taxonomy: TaxonomyCsv = None,
        val: ValDir = None,
        branch: Annotated[
            str | None, typer.Option(help="Retrain only this level-1 branch's expert inside RUN/experts.")
        ] = None,
        expert_other: Annotated[
            bool | None,
            typer.Option(
                "--expert-other/--no-expert-other",
                help="Every expert also learns an 'other' class from the other branches' images, so routing "
                "mistakes can be recovered at inference (costs about a flat head per step).",
                show_default=False,
            ),
        ] = None,
        config: ConfigFile = None,
        overwrite: Overwrite = False,
        progress: Progress = None,
        **options: Any,
    ) -> None:
        _train(
            kind, train, val, taxonomy, run, branch, config, overwrite,
            expert_other=expert_other, progress=progress, **options,
        )  # fmt: skip

    train_cmd.__doc__ = doc
    train_cmd.__name__ = f"train_{kind}"
    # typer reads this signature: every TrainConfig field as an option; --branch and --expert-other on
    # train-experts only (eval_str: resolved annotations).
    sig = inspect.signature(train_cmd, eval_str=True)
    keep = [
        p
        for p in sig.parameters.values()
        if p.kind != inspect.Parameter.VAR_KEYWORD and (kind == "experts" or p.name not in ("branch", "expert_other"))
    ]
    train_cmd.__signature__ = sig.replace(parameters=keep + config_parameters())  # type: ignore[attr-defined]
    command(name=f"train-{kind}", context_settings={"help_option_names": ["-h", "--help"]})(train_cmd)


_train_command("router", "Train the router (level-1 branches) into RUN/router.")
_train_command("experts", "Train the experts (one per branch, packed) into RUN/experts, or one expert with --branch.")
_train_command("flat", "Train the flat baseline (all leaves) into RUN/flat.")
