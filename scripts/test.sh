#!/usr/bin/env bash
# Set everything up and run the default test suite (slow tests: add `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The remote-runner tests start a real OpenSSH server on 127.0.0.1; install it where missing.
[ -f scripts/ci_services.sh ] && bash scripts/ci_services.sh
. .venv/bin/activate
set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests; that is not a failure of the code under test.
[ "$rc" -eq 5 ] && rc=0
exit "$rc"
