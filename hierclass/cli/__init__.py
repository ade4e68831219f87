"""The ``hierclass`` command line: a thin typer shell over the library.

One module per area registers its commands on :data:`app`; importing this package
registers them all.
"""

from hierclass.cli import data, demo, evaluate, features, serve, taxonomy, train  # noqa: F401  (registers commands)
from hierclass.cli.app import app


def main() -> None:
    """Entry point of the ``hierclass`` console script."""
    app()


__all__ = ["app", "main"]
