"""`clearbudget --version`: the installed package's version (the checkout's if not installed)."""

from __future__ import annotations

from pathlib import Path

import typer

DISTRIBUTION = "clearbudget"
# An install that lost its package metadata reads the checkout's version here.
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def package_version() -> str:
    """The version in the installed package metadata; failing that, the checkout's
    pyproject.toml; failing that, "unknown"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return _checkout_version() or "unknown"


def _checkout_version() -> str | None:
    import tomllib

    try:
        project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if project.get("name") != DISTRIBUTION or not isinstance(project.get("version"), str):
        return None
    return project["version"]


def print_version(value: bool) -> None:
    """The eager `--version` option's callback: print `clearbudget <version>` and exit 0."""
    if value:
        typer.echo(f"{DISTRIBUTION} {package_version()}")
        raise typer.Exit()
