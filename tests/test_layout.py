"""The layout's rules, read from the source: which room may import what (arrows point down)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PACKAGE = "clearbudget"
OUR_ROOMS = ("daemon", "solver", "schemas")

# Room → module prefixes it must never import (our own rooms by their name under `clearbudget.`).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "solver": (
        "asyncio", "aiokafka", "aiohttp", "httpx", "socket", "typer", "rich", "structlog",
        "logging", "prometheus_client", "daemon",
    ),
    "schemas": ("asyncio", "aiokafka", "aiohttp", "typer", "daemon", "solver"),
    "daemon/core": (
        "aiokafka", "aiohttp", "httpx", "typer", "rich", "daemon.kafka", "daemon.vllm",
        "daemon.replay", "daemon.cli", "daemon.app", "daemon.settings", "daemon.http_server",
    ),
    "daemon/kafka": ("aiohttp", "httpx", "typer", "daemon.vllm", "daemon.replay", "daemon.cli"),
    "daemon/vllm": (
        "aiokafka", "typer", "daemon.kafka", "daemon.replay", "daemon.cli", "daemon.app",
    ),
    "daemon/replay": ("typer", "daemon.cli"),
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violates(module: str, prefix: str) -> bool:
    if prefix.split(".")[0] in OUR_ROOMS:
        prefix = f"{PACKAGE}.{prefix}"
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports_only_what_it_may(room: str) -> None:
    files = sorted((ROOT / room).rglob("*.py"))
    assert files, f"{room} holds no Python files"
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if any(_violates(module, prefix) for prefix in FORBIDDEN[room])
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("room", OUR_ROOMS)
def test_our_modules_import_each_other_by_the_installed_name(room: str) -> None:
    """The rooms install as `clearbudget.daemon` etc.: a bare `import daemon` would pick up
    another distribution's module (python-daemon installs `daemon`)."""
    files = [*ROOT.glob("daemon/**/*.py"), *ROOT.glob("solver/**/*.py"),
             *ROOT.glob("schemas/**/*.py"), *ROOT.glob("tests/**/*.py"),
             *ROOT.glob("benchmarks/**/*.py")]  # fmt: skip
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if module == room or module.startswith(room + ".")
    ]
    assert not bad, "\n".join(bad)


def test_daemon_top_level_holds_at_most_four_modules() -> None:
    modules = sorted(p.name for p in (ROOT / "daemon").glob("*.py"))
    assert len(modules) <= 4, modules


@pytest.mark.parametrize(
    "package",
    sorted(p.parent for p in ROOT.glob("daemon/**/__init__.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_daemon_package_says_its_role_and_imports(package: Path) -> None:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    assert "import" in doc, f"{package.relative_to(ROOT)}: docstring must say what it may import"


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        "import aiokafka.admin\nfrom clearbudget.daemon.kafka.service import Daemon\n"
    )
    found = imported_modules(sample)
    assert any(_violates(m, "aiokafka") for m in found)
    assert any(_violates(m, "daemon.kafka") for m in found)
    assert not any(_violates(m, "daemon.k") for m in found)
