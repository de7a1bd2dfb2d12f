"""The lock file launch/constraints.txt: write it from an environment, or check an environment against it.

    python launch/lock.py write FILE    pin every distribution installed here (but torch, normtron and pip's own
                                        tools: launch/install.sh installs torch itself)
    python launch/lock.py check FILE    print the locked versions installed here; exit 1 if any differs
    python launch/lock.py python FILE   the Python version (major.minor) the lock was resolved for
"""

from __future__ import annotations

import sys
from importlib.metadata import distributions
from pathlib import Path

HEADER = """\
# python: {python}
# The exact versions CI and launch/test.sh install (pip install -c), resolved on Linux for Python {python} with the
# CPU build of torch 2.13.0, which launch/install.sh installs itself (it applies this file only to that Python).
# Written by `bash launch/refresh-constraints.sh`, which resolves the newest versions of everything in a fresh venv,
# runs the test suite on them and rewrites this file only when it passes. pyproject.toml keeps the ranges.
"""
UNLOCKED = {"torch", "normtron", "pip", "setuptools", "wheel"}
# CUDA-only dependencies torch brings along on GPU machines
UNLOCKED_PREFIXES = ("nvidia-", "cuda-")


def _name(text: str) -> str:
    return text.strip().lower().replace("_", "-").replace(".", "-")


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def installed() -> dict[str, str]:
    """The distributions installed in this environment's own prefix (not those a --system-site-packages venv sees
    of the Python it was made from, e.g. a GPU container's)."""
    prefix = Path(sys.prefix).resolve()
    found = {_name(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]
             and prefix in Path(str(d.locate_file(""))).resolve().parents}
    return {n: v for n, v in sorted(found.items()) if n not in UNLOCKED and not n.startswith(UNLOCKED_PREFIXES)}


def read(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    return pins


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check", "python"):
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "python":
        first = path.read_text().splitlines()[0]
        print(first.removeprefix("# python:").strip() if first.startswith("# python:") else "")
        return 0
    if argv[0] == "write":
        path.write_text(HEADER.format(python=python_version()) + "".join(f"{n}=={v}\n" for n, v in installed().items()))
        return 0
    pins, have = read(path), installed()
    wrong = [f"{n}=={v} (installed: {have.get(n, 'none')})" for n, v in pins.items()
             if n in have and have[n] != v]
    print(f"locked versions installed ({len(pins) - len(wrong)} of {len(pins)} in {path.name}, the rest not "
          f"needed here): " + " ".join(f"{n}=={have[n]}" for n in pins if n in have))
    if wrong:
        print("normtron: error: installed versions differ from the lock: " + ", ".join(wrong), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
