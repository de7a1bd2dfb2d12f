#!/usr/bin/env bash
# Install normtron with its dev extras into .venv and run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=dev bash launch/install.sh
exec "${NORMTRON_VENV:-.venv}/bin/python" -m pytest tests --durations=15 "$@"
