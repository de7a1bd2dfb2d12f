#!/usr/bin/env bash
# Create .venv (if missing) and install normtron into it, at the versions of launch/constraints.txt.
#   bash launch/install.sh                          the package
#   EXTRAS=dev bash launch/install.sh               the package and the test tools (what CI installs)
#   NORMTRON_CONSTRAINTS=none bash launch/install.sh   the newest versions instead of the locked ones
# torch: an installed torch (in the venv, or in $PYTHON's own site-packages) is kept as it is; otherwise the CUDA
# build where an NVIDIA GPU is present and the CPU build torch==2.13.0 where none is (an unpinned torch on a CPU
# machine would pull a multi-GB CUDA build). The lock holds no torch, and on a CUDA machine its triton line is left
# out too: CUDA builds of torch pin their own. The lock is applied only to the Python version it was resolved for.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${NORMTRON_VENV:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${NORMTRON_CONSTRAINTS:-launch/constraints.txt}

if [ ! -x "$VENV/bin/python" ]; then
  if system_torch=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    # e.g. a GPU container with its own torch build: keep it visible inside the venv instead of reinstalling.
    echo "creating $VENV on top of $("$PYTHON" --version) and its installed torch $system_torch"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    echo "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
  fi
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

cuda=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=1; fi
if torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "keeping the installed torch $torch_version"
elif [ -n "$cuda" ]; then
  echo "NVIDIA GPU found: installing torch (CUDA build)"
  pip_install torch
else
  echo "no NVIDIA GPU: installing the CPU build of torch==2.13.0"
  pip_install torch==2.13.0
fi

lock=()
if [ "$CONSTRAINTS" != none ]; then
  [ -f "$CONSTRAINTS" ] || { echo "normtron: error: install.sh: no constraints file $CONSTRAINTS (NORMTRON_CONSTRAINTS=none for the newest versions)" >&2; exit 2; }
  locked_for=$("$VENV/bin/python" launch/lock.py python "$CONSTRAINTS")
  here=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
  if [ "$locked_for" != "$here" ]; then
    echo "warning: $CONSTRAINTS was resolved for Python $locked_for, this is $here: installing the newest versions instead"
    CONSTRAINTS=none
  else
    used=$VENV/constraints-used.txt  # the lock as applied here
    # A CUDA build of torch pins its own triton (and its own dependencies, when kept from a container's Python).
    if "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
      grep -v '^triton==' "$CONSTRAINTS" > "$used"
    else
      cp "$CONSTRAINTS" "$used"
    fi
    lock=(-c "$used")
  fi
fi
echo "installing normtron${EXTRAS:+[$EXTRAS]} into $VENV ($([ "$CONSTRAINTS" = none ] && echo "newest versions" || echo "versions of $CONSTRAINTS"))"
pip_install -e ".${EXTRAS:+[$EXTRAS]}" "${lock[@]}"
if [ "$CONSTRAINTS" != none ]; then
  "$VENV/bin/python" launch/lock.py check "$used"  # what the venv itself holds, at the lock's versions
fi
