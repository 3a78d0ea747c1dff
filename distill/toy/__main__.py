"""`python -m distill.toy prepare|build|install`: make the toy world's models (see build.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from distill.cli import OVERRIDES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _config(out: Path, install: bool, overrides: Optional[List[str]]):
    from distill.config import load_config
    from distill.toy.build import BuildConfig

    return load_config(BuildConfig, flags={"out": out, "install": install}, overrides=overrides or ()).config


@app.command()
def prepare(out: Path = typer.Option(Path("runs/toy-build"), "--out"), overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Write the toy corpora and the initial model weights into OUT."""
    from distill.toy.build import prepare as run

    for name, path in run(_config(out, False, overrides)).items():
        typer.echo(f"{name}: {path}")


@app.command()
def build(
    out: Path = typer.Option(Path("runs/toy-build"), "--out"),
    install: bool = typer.Option(False, "--install", help="Copy the models into distill/toy/assets."),
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Prepare, train the teacher and the base student with `distill train`, measure, install."""
    import json

    from distill.toy.build import build as run

    quality = run(_config(out, install, overrides))
    typer.echo(json.dumps({k: v["accuracy"] for k, v in quality["models"].items()}, indent=2))


@app.command()
def install(out: Path = typer.Option(Path("runs/toy-build"), "--out")) -> None:
    """Copy an already built OUT into distill/toy/assets."""
    from distill.toy.build import install as run

    run(out)


if __name__ == "__main__":
    import sys

    from distill.errors import DistillError

    try:
        app()
    except DistillError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
