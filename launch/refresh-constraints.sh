#!/usr/bin/env bash
# Try the newest versions of everything: resolve normtron[dev] without the lock in a fresh venv, run the test suite
# there, and only if it passes rewrite launch/constraints.txt with what was resolved (and print what changed).
#
#   bash launch/refresh-constraints.sh [PYTEST ARGS]     e.g. -x
#
# Only a run of the whole suite may rewrite the lock: with a -k or path selection, pass --no-write first
# (bash launch/refresh-constraints.sh --no-write -k convert) to look without rewriting.
#
# An upstream release that breaks normtron then shows up here, as a failing refresh, instead of in CI. The venv is
# .venv-newest (NORMTRON_NEWEST_VENV); it is kept, so a failure can be reproduced with its python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${NORMTRON_NEWEST_VENV:-.venv-newest}
WRITE=1
if [ "${1:-}" = --no-write ]; then WRITE=""; shift; fi
rm -rf "$VENV"
NORMTRON_VENV=$VENV NORMTRON_CONSTRAINTS=none EXTRAS=dev bash launch/install.sh
new=$(mktemp)
trap 'rm -f "$new"' EXIT
"$VENV/bin/python" launch/lock.py write "$new"
echo "== resolved versions that differ from launch/constraints.txt:"
changes=$(diff <(grep -v '^#' launch/constraints.txt) <(grep -v '^#' "$new") | grep '^[<>]' || true)
echo "${changes:-(none)}"
echo "== running the test suite on them"
if NORMTRON_VENV=$VENV "$VENV/bin/python" -m pytest tests --durations=15 "$@"; then
  if [ -n "$WRITE" ]; then
    cp "$new" launch/constraints.txt
    echo "refresh passed: launch/constraints.txt rewritten (commit it)"
  else
    echo "refresh passed (--no-write: launch/constraints.txt unchanged)"
  fi
else
  echo "normtron: error: the test suite fails on the newest versions above; launch/constraints.txt is unchanged" >&2
  exit 1
fi
