"""The typer app and the helpers every command module uses.

Each command parses its options, calls one library function and prints a summary. Any
:class:`~hierclass.errors.HierclassError` becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from hierclass import __version__
from hierclass.errors import HierclassError

# Command modules import torch, timm and the readers inside their commands, so that ``--help``
# answers at once; tests/test_cli.py checks that importing the CLI leaves them out.
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # commands and sub-apps inherit it

app = typer.Typer(
    name="hierclass",
    help="Two-stage (router + experts) image classification into a deep category tree.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=HELP_OPTIONS,
)

Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars (on stderr).")]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"hierclass {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Two-stage (router + experts) image classification into a deep category tree."""


F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print one error line on stderr and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def clean_errors(func: F) -> F:
    """Turn user errors (and operating-system errors) into one stderr line and exit code 1, with no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HierclassError as e:
            raise fail(str(e)) from None
        except OSError as e:  # a full disk, a read-only file system, a permission: the path and the fix
            from hierclass.outputs import os_error_message

            raise fail(os_error_message(e)) from None
        except KeyboardInterrupt:
            raise fail("interrupted; long jobs resume where they stopped when run again") from None

    return wrapper  # type: ignore[return-value]


def command(target: typer.Typer = app, **kwargs: Any) -> Callable[[F], F]:
    """Register a CLI command whose user errors print one clean line."""

    def register(func: F) -> F:
        target.command(**kwargs)(clean_errors(func))
        return func

    return register
