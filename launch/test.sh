#!/usr/bin/env bash
# Install normtron with its dev extras into .venv at the locked versions (launch/constraints.txt) and run the whole
# test suite (extra arguments go to pytest). `bash launch/refresh-constraints.sh` does the same on the newest versions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=dev bash launch/install.sh
exec "${NORMTRON_VENV:-.venv}/bin/python" -m pytest tests --durations=15 "$@"
