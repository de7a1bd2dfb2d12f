from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import MICRO_MODEL, run_cli


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """The real default corpus, downloaded once per machine into the normtron cache."""
    cache = os.environ.get("NORMTRON_CACHE", str(Path.home() / ".cache" / "normtron"))
    out = run_cli("download-corpus", "shakespeare", "--cache-dir", cache).stdout.strip().splitlines()[-1]
    return Path(out)


@pytest.fixture(scope="session")
def shakespeare_data(shakespeare_dir, tmp_path_factory) -> Path:
    """Shakespeare prepared with a small vocabulary (fast softmax for micro models)."""
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    run_cli("prepare-data", "--input", str(shakespeare_dir), "--output", str(out), "--vocab-size", "512")
    return out


@pytest.fixture
def micro_args(shakespeare_data, tmp_path):
    """Overrides for a micro model on the prepared Shakespeare data, writing runs under tmp_path."""
    def make(name: str, *extra: str) -> list[str]:
        return [f"data.dir={shakespeare_data}", f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}",
                *MICRO_MODEL, *extra]
    return make
