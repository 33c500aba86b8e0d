"""The checkout's top-level rooms install under our own name: `daemon/` as `clearbudget.daemon`,
and so on, so an install never shadows or is shadowed by another distribution's `daemon`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import clearbudget.daemon
import clearbudget.schemas
import clearbudget.solver

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("daemon", "schemas", "solver")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_installed_under_clearbudget() -> None:
    folders = {
        "clearbudget." + ".".join(init.parent.relative_to(ROOT).parts)
        for room in ROOMS
        for init in (ROOT / room).rglob("__init__.py")
    }
    assert set(_setuptools()["packages"]) == folders


def test_each_room_maps_to_its_folder_and_imports_from_there() -> None:
    assert _setuptools()["package-dir"] == {f"clearbudget.{room}": room for room in ROOMS}
    for module, room in ((clearbudget.daemon, "daemon"), (clearbudget.schemas, "schemas"),
                         (clearbudget.solver, "solver")):  # fmt: skip
        assert Path(module.__file__).resolve().parent == ROOT / room


def test_the_console_script_points_at_the_installed_name() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"clearbudget": "clearbudget.daemon.cli:app"}
