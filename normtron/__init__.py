"""normtron: distributed pretraining of decoder-only language models with normalization as a swappable choice.

Its sub-packages are the repository's top-level folders: `normtron.models` is models/, `normtron.kernels` is
kernels/, likewise parallel/ and trainer/, and the shipped configs/ and launch/ templates are package data. A wheel
puts them inside this package (setuptools' package-dir, pyproject.toml). The folders have no __init__.py, so a
Python started in the repository root never shadows another distribution's `kernels` or `models` with them; in a
source checkout (an editable install, or the repository root on sys.path) they are found beside this folder.
"""

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "models")) and _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")):
    __path__.append(_checkout)  # noqa: F821 (a package's __path__)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("normtron")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "0+unknown"


__version__ = _version()
