#!/usr/bin/env bash
# The checks CI runs (.ci/run), in order: ruff, mypy --strict, then pytest.
#   scripts/test.sh               every check and every test (the VM scenarios included)
#   scripts/test.sh ARGS...       ARGS go to pytest, e.g. -m "not vm" or -m "not vm and not slow"
# ruff and mypy both run and both report; if either fails, pytest does not run and this exits 1.
# pytest's exit status is passed through unchanged (5 = no test ran is a failure, never hidden).
# Needs the test install: bash scripts/install.sh --test
set -euo pipefail
cd "$(dirname "$0")/.."

failed=()
echo "test.sh: ruff check ." >&2
.venv/bin/python -m ruff check . || failed+=(ruff)
echo "test.sh: mypy --strict ktlsd" >&2
.venv/bin/python -m mypy --strict ktlsd || failed+=(mypy)
if [ "${#failed[@]}" -gt 0 ]; then
    echo "test.sh: ${failed[*]} failed; pytest not run" >&2
    exit 1
fi
echo "test.sh: pytest $*" >&2
exec .venv/bin/python -m pytest "$@"
