"""Weighted mixtures of sources (data.sources): the blending rule's realized shares, world-size independence, exact
resume, per-source validation loss, single-source equivalence with data.dir, and one-line config errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import MICRO_MODEL, TINY, read_metrics, run_cli, run_torchrun

from normtron.trainer.config import DataConfig, load_config, validate
from normtron.trainer.data.batches import TokenStream, TrainBatches
from normtron.trainer.data.mixture import MixtureBatches, Source, open_sources
from normtron.trainer.errors import UserError

TIMING_KEYS = {"tokens_per_sec", "elapsed_s", "eta_s", "mfu"}


@pytest.fixture(scope="module")
def two_sources(shakespeare_dir, shakespeare_data, tmp_path_factory):
    """Shakespeare's plays split in two halves, each prepared by prepare-data with the same tokenizer."""
    root = tmp_path_factory.mktemp("mixture")
    files = sorted(shakespeare_dir.glob("*.txt"))
    dirs = []
    for name, half in (("first", files[:len(files) // 2]), ("second", files[len(files) // 2:])):
        (root / f"{name}_text").mkdir()
        for f in half:
            shutil.copy(f, root / f"{name}_text" / f.name)
        run_cli("prepare-data", "--input", str(root / f"{name}_text"), "--output", str(root / name),
                "--tokenizer", str(shakespeare_data / "tokenizer.model"))
        dirs.append(root / name)
    return dirs


def stream(values: np.ndarray) -> TokenStream:
    return TokenStream([(values, 0, len(values))])


def synthetic_sources(weights, sizes=(4 * 50 + 1, 4 * 13 + 1)) -> list[Source]:
    """Sources whose token values tell them apart: source i holds ids 1000*i + position."""
    return [Source(f"s{i}", w, f"data.sources[{i}].dir", f"s{i}", {}, stream(1000 * i + np.arange(n)),
                   stream(np.arange(10)), None) for i, (w, n) in enumerate(zip(weights, sizes))]


def mixture(sources, rank=0, world=1, global_batch=8, seed=3):
    return MixtureBatches(sources, seq_len=4, global_batch=global_batch, dp_rank=rank, dp_size=world, seed=seed)


def test_blending_tracks_the_weights_and_each_source_its_own_epochs():
    sources = synthetic_sources([0.7, 0.3])
    single, ranks = mixture(sources), [mixture(sources, r, 2) for r in range(2)]
    drawn = np.zeros(2)
    first_windows = {0: [], 1: []}
    for step in range(200):
        x, y = single.next_batch()
        # World size 2: the two ranks' halves are the single process's batch.
        halves = [r.next_batch()[0].numpy() for r in ranks]
        assert np.array_equal(np.concatenate(halves), x.numpy())
        assert np.array_equal(y.numpy(), x.numpy() + 1)
        origin = x[:, 0].numpy() // 1000  # which source each row came from, read off its tokens
        for s in (0, 1):
            first_windows[s] += [int(v) % 1000 // 4 for v in x[origin == s, 0]]
        drawn += np.bincount(origin, minlength=2)
        # The deficit rule keeps every prefix within one window of the weights.
        assert np.all(np.abs(drawn - np.array([0.7, 0.3]) * drawn.sum()) <= 1)
    assert drawn / drawn.sum() == pytest.approx([0.7, 0.3], abs=0.02)
    assert single.shares() == pytest.approx({"s0": drawn[0] / 1600, "s1": drawn[1] / 1600})
    # Each source visits every one of its windows once per epoch (50 and 13 windows), in its own order.
    for s, n in ((0, 50), (1, 13)):
        epochs = len(first_windows[s]) // n
        for e in range(epochs):
            assert sorted(first_windows[s][e * n:(e + 1) * n]) == list(range(n))
    # The first source draws exactly the windows a single-source run would, in the same order.
    alone = TrainBatches(sources[0].train, 4, 8, 0, 1, 3)
    alone_windows = [int(v) // 4 for _ in range(20) for v in alone.next_batch()[0][:, 0]]
    assert first_windows[0][:160] == alone_windows[:160]


def test_mixture_state_resumes_with_the_exact_next_batch():
    sources = synthetic_sources([0.5, 0.25, 0.25], sizes=(4 * 9 + 1, 4 * 7 + 1, 4 * 5 + 1))
    a = mixture(sources, 1, 2, global_batch=6)
    for _ in range(7):
        a.next_batch()
    b = mixture(sources, 1, 2, global_batch=6)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(9):
        assert np.array_equal(a.next_batch()[0].numpy(), b.next_batch()[0].numpy())
    assert a.shares() == b.shares()
    # A single-source checkpoint cannot silently resume a mixture (and the other way round).
    with pytest.raises(UserError, match="one source"):
        mixture(sources).load_state_dict(TrainBatches(sources[0].train, 4, 8, 0, 1, 3).state_dict())
    with pytest.raises(UserError, match="mixture of 3 sources"):
        TrainBatches(sources[0].train, 4, 8, 0, 1, 3).load_state_dict(a.state_dict())


def mix_args(two_sources, tmp_path, name, *extra):
    first, second = two_sources
    return [f"data.sources=[{{dir: {first}, weight: 0.7}}, {{dir: {second}, weight: 0.3, name: code}}]",
            f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", *MICRO_MODEL, *extra]


def test_mixture_run_shares_validation_and_exact_resume(two_sources, tmp_path):
    common = ("training.steps=200", "checkpoint.every=100", "eval.every=100", "logging.every=20",
              "diagnostics.every=0")
    out = run_cli("train", TINY, *mix_args(two_sources, tmp_path, "mix", *common))
    train, evals = read_metrics(tmp_path / "runs" / "mix")
    last = train[-1]
    assert last["step"] == 200
    assert last["data_share/first"] == pytest.approx(0.7, abs=0.02)
    assert last["data_share/code"] == pytest.approx(0.3, abs=0.02)
    assert "data first 70.0% code 30.0%" in out.stdout  # the log shows the shares too
    # Per-source validation loss, and the overall one their weighted mean (the documented combination).
    for row in evals:
        assert row["val_loss"] == pytest.approx(0.7 * row["val_loss/first"] + 0.3 * row["val_loss/code"],
                                                rel=1e-12)
        assert row["val_ppl/code"] == pytest.approx(np.exp(row["val_loss/code"]), rel=1e-9)
    assert evals[-1]["val_loss/first"] < evals[0]["val_loss/first"] < np.log(512)
    # Resume from the step-100 checkpoint: steps 101..200 (losses, shares, evaluations) equal the whole run's.
    shutil.copytree(tmp_path / "runs" / "mix", tmp_path / "runs" / "resumed")
    shutil.rmtree(tmp_path / "runs" / "resumed" / "checkpoints" / "step_00000200")
    out = run_cli("train", TINY, *mix_args(two_sources, tmp_path, "resumed", *common))
    assert "resumed from" in out.stdout
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    resumed_train, resumed_evals = read_metrics(tmp_path / "runs" / "resumed")
    assert strip(resumed_train) == strip(train) and resumed_evals == evals
    # Resuming the mixture's checkpoint with other data fails with one line and leaves the run as it was.
    before = (tmp_path / "runs" / "resumed" / "metrics.jsonl").read_text()
    first, _ = two_sources
    result = run_cli("train", TINY, f"data.dir={first}", *mix_args(two_sources, tmp_path, "resumed")[1:],
                     "training.steps=300", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "holds the data position of other data" in result.stderr
    assert (tmp_path / "runs" / "resumed" / "metrics.jsonl").read_text() == before


def test_two_ranks_draw_the_same_mixture_batches(two_sources, tmp_path):
    """DDP and a 2-stage pipeline (its own evaluation path) reproduce the single process's losses, per source too."""
    common = ("training.steps=4", "checkpoint.every=4", "eval.every=2", "diagnostics.every=0")
    run_cli("train", TINY, *mix_args(two_sources, tmp_path, "single", *common))
    single, single_val = read_metrics(tmp_path / "runs" / "single")
    for name, layout in (("ddp", ["training.micro_batch_size=2"]),
                         ("pp", ["parallel.backend=fsdp", "parallel.pp=2", "parallel.pp_schedule=GPipe"])):
        run_torchrun(2, "train", TINY, *mix_args(two_sources, tmp_path, name, *common, *layout))
        train, evals = read_metrics(tmp_path / "runs" / name)
        assert [r["step"] for r in train] == [1, 2, 3, 4] and len(evals) == len(single_val) == 2
        for a, b in zip(single, train):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["data_share/code"] == a["data_share/code"]
        for a, b in zip(single_val, evals):
            for key in ("val_loss", "val_loss/first", "val_loss/code"):
                assert b[key] == pytest.approx(a[key], rel=1e-5)


def test_one_source_in_data_sources_equals_data_dir(shakespeare_data, tmp_path):
    common = [f"run.output_dir={tmp_path}", *MICRO_MODEL, "training.steps=3", "checkpoint.every=3",
              "eval.every=3", "diagnostics.every=0"]
    run_cli("train", TINY, f"data.dir={shakespeare_data}", "run.name=dir", *common)
    run_cli("train", TINY, f"data.sources=[{{dir: {shakespeare_data}, weight: 2.5}}]", "run.name=sources", *common)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    by_dir, by_sources = read_metrics(tmp_path / "dir"), read_metrics(tmp_path / "sources")
    assert strip(by_dir[0]) == strip(by_sources[0]) and by_dir[1] == by_sources[1]
    assert "val_loss/shakespeare" not in by_sources[1][0] and "data_share/shakespeare" not in by_sources[0][0]


@pytest.mark.parametrize("sources, message", [
    ("[]", "data.sources is empty"),
    ("[{dir: a, weight: 0}]", "data.sources[0].weight=0 must be a positive number"),
    ("[{dir: a, weight: -1}]", "data.sources[0].weight=-1 must be a positive number"),
    ("[{dir: a, weight: x}]", "data.sources[0].weight='x' must be a positive number"),
    ("[{dir: x/web}, {dir: y/web}]", "data.sources[1].name='web' is used by another source too"),
    ("[{dir: a, wieght: 1}]", "data.sources[0] has unknown key(s) wieght"),
    ("[{weight: 1}]", "data.sources[0].dir is missing"),
    ("[{dir: a, name: 'a/b'}]", "data.sources[0].name='a/b' must be a plain name"),
    ("web", "data.sources expects list of mappings"),
])
def test_bad_source_configs_name_the_key(sources, message):
    with pytest.raises(UserError) as err:
        validate(load_config(TINY, [f"data.sources={sources}"]))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_sources_on_the_command_line_exit_2(two_sources, tmp_path):
    first, second = two_sources
    result = run_cli("train", "--check", TINY, f"data.sources=[{{dir: {first}, weight: 0.5}}, {{dir: {first}}}]",
                     check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("normtron: error: data.sources[1].name='first' is used by another source")
    # A source that does not exist is named by its key.
    with pytest.raises(UserError, match=r"^data.sources\[1\].dir=.*nowhere does not exist"):
        open_sources(DataConfig(sources=[{"dir": str(first)}, {"dir": str(tmp_path / "nowhere")}]))


def test_format2_shards_read_as_one_stream(tmp_path):
    """Format 2: a split's stream is its shard files concatenated in meta.json's order; a 0-byte file is allowed."""
    from normtron.trainer.data.batches import open_tokens

    rng = np.random.default_rng(0)
    (tmp_path / "shards").mkdir()
    files = {"00000": (rng.integers(0, 500, 1001), rng.integers(0, 500, 37)),
             "00001": (rng.integers(0, 500, 3), np.zeros(0, int)),
             "00002": (rng.integers(0, 500, 2222), rng.integers(0, 500, 300))}
    for name, (train, val) in files.items():
        train.astype(np.uint16).tofile(tmp_path / "shards" / f"{name}.train.bin")
        val.astype(np.uint16).tofile(tmp_path / "shards" / f"{name}.val.bin")
    meta = {"format": 2, "dtype": "uint16", "vocab_size": 500, "shards": [{"name": n} for n in files]}
    for split, column in (("train", 0), ("val", 1)):
        whole = np.concatenate([files[n][column] for n in files]).astype(np.uint16)
        stream = open_tokens(tmp_path, split, meta)
        assert len(stream) == len(whole)
        for a, b in ((0, len(whole)), (990, 1010), (1000, 1005), (1003, 1004), (37, 38), (5, 5)):
            assert np.array_equal(stream[a:b], whole[a:b])
    # Batches over the shards are those over the concatenated tokens.
    whole = np.concatenate([files[n][0] for n in files]).astype(np.uint16)
    sharded = TrainBatches(open_tokens(tmp_path, "train", meta), 16, 8, 0, 1, 7)
    flat = TrainBatches(whole, 16, 8, 0, 1, 7)
    for _ in range(40):
        assert all(np.array_equal(a, b) for a, b in zip(sharded.next_batch(), flat.next_batch()))
    # An id beyond the vocabulary in any shard's first/last million tokens is refused with one line.
    np.array([7, 600], dtype=np.uint16).tofile(tmp_path / "shards" / "00001.train.bin")
    with pytest.raises(UserError, match="holds token id 600, outside the vocabulary of 500"):
        open_tokens(tmp_path, "train", meta)
