"""CLI start-up: how long `clearbudget --help` and each command's `--help` take.

Usage: python benchmarks/help_bench.py [--repeats 5]
Each run is a fresh interpreter (the installed `clearbudget` script next to this Python, or
`python -m clearbudget.daemon.cli` without it), timed from spawn to exit; the table shows the
median and the slowest of `--repeats` runs per command. Exits 1 if any `--help` fails or any
median exceeds `--limit` seconds (default 1.0).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

from clearbudget.daemon.cli import app


def clearbudget_command() -> list[str]:
    """The installed console script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("clearbudget")
    if script.is_file():
        return [str(script)]
    found = shutil.which("clearbudget")
    return [found] if found else [sys.executable, "-m", "clearbudget.daemon.cli"]


def command_names() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(group.commands)  # type: ignore[attr-defined]  # a click Group


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="Runs per command (default 5).")
    parser.add_argument("--limit", type=float, default=1.0, help="Seconds a median may take.")
    args = parser.parse_args()
    base = clearbudget_command()
    rows = [("clearbudget --help", [*base, "--help"])]
    rows += [(f"clearbudget {name} --help", [*base, name, "--help"]) for name in command_names()]
    print(f"{'command':<40} {'median s':>9} {'max s':>7}   ({args.repeats} runs each)")
    slow = []
    for label, argv in rows:
        times = [time_once(argv) for _ in range(args.repeats)]
        median = statistics.median(times)
        print(f"{label:<40} {median:>9.3f} {max(times):>7.3f}")
        if median > args.limit:
            slow.append(label)
    if slow:
        print(f"over {args.limit:g} s: {', '.join(slow)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
