from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import MICRO_MODEL, run_cli
from slurm_cluster import LocalSlurm, SlurmUnavailable


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


@pytest.fixture(scope="module")
def slurm():
    """A real two-node Slurm cluster on this machine (tests/slurm_cluster.py), one per test module; CI must have it."""
    try:
        with LocalSlurm(nodes=2, cpus=2) as cluster:
            yield cluster
        assert not cluster.processes(), "a Slurm daemon or job outlived the cluster"
    except SlurmUnavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests: {err}")
        pytest.skip(f"no Slurm: {err}")


@pytest.fixture
def float64():
    """Tensors the test creates default to float64 (the exact reference formulas)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def poisoned():
    """torch.empty returns NaN-filled memory while this is active: an element a kernel forgets to write fails."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
