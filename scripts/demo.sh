#!/usr/bin/env bash
# Install clearbudget (base + the embedded broker) into .venv and run the one-command demo:
# a slice of the recorded Azure trace through the real daemon path, clear vs uniform.
# Extra arguments go to `clearbudget demo` (see `clearbudget demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh demo
# shellcheck disable=SC1091
. .venv/bin/activate
clearbudget demo "$@"
