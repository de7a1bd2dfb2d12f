"""Bad input: one clear line on stderr, exit code 2, no traceback, and nothing already on disk changed."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import MICRO_MODEL, TINY, run_cli, tree_digest

from normtron.trainer.data.format import split_files


@pytest.fixture(scope="module")
def existing(shakespeare_data, tmp_path_factory):
    """A prepared data directory and a finished run with checkpoints: what a failed command must not touch."""
    root = tmp_path_factory.mktemp("existing")
    data = root / "data"
    shutil.copytree(shakespeare_data, data)
    small = root / "small"  # ~2k tokens: too short for long sequences
    (root / "small_src").mkdir()
    (root / "small_src" / "a.txt").write_text("Shall I compare thee to a summer's day?\n" * 60)
    run_cli("prepare-data", "--input", str(root / "small_src"), "--output", str(small), "--vocab-size", "300")
    run_cli("train", TINY, f"data.dir={data}", f"run.output_dir={root / 'runs'}", "run.name=done", *MICRO_MODEL,
            "training.steps=2", "checkpoint.every=1")
    (root / "a_file").write_text("not a directory\n")
    return root


def assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normtron: error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def unchanged(existing):
    before = tree_digest(existing)
    yield existing
    assert tree_digest(existing) == before


def prepare(root, *args):
    return run_cli("prepare-data", *args, check=False)


def train(root, *overrides, config=TINY):
    return run_cli("train", config, f"data.dir={root / 'data'}", f"run.output_dir={root / 'runs'}",
                   "run.name=done", *MICRO_MODEL, "training.steps=3", *overrides, check=False)


def test_missing_corpus(unchanged, tmp_path):
    result = prepare(unchanged, "--input", str(tmp_path / "nope"), "--output", str(unchanged / "data"))
    assert_user_error(result, "does not exist")


def test_empty_corpus(unchanged, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n\n")
    result = prepare(unchanged, "--input", str(tmp_path / "empty"), "--output", str(unchanged / "data"))
    assert_user_error(result, "empty")


def test_directory_without_text_files(unchanged, tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"\x89PNG")
    result = prepare(unchanged, "--input", str(tmp_path / "pics"), "--output", str(unchanged / "data"))
    assert_user_error(result, "no .txt/.jsonl/.json (optionally .gz or .zst) or .parquet files")


def test_non_utf8_file(unchanged, tmp_path):
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "a.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 10)
    result = prepare(unchanged, "--input", str(tmp_path / "latin"), "--output", str(unchanged / "data"))
    assert_user_error(result, "a.txt is not valid UTF-8", "0xe9")


def test_bad_jsonl_line(unchanged, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    result = prepare(unchanged, "--input", str(tmp_path / "x.jsonl"), "--output", str(unchanged / "data"))
    assert_user_error(result, "line 2 has no string field 'text'")


def test_prepare_output_is_a_file(unchanged, shakespeare_dir):
    result = prepare(unchanged, "--input", str(shakespeare_dir), "--output", str(unchanged / "a_file"))
    assert_user_error(result, "is a file")


def test_corpus_too_small_for_a_validation_split(unchanged, tmp_path):
    (tmp_path / "one.txt").write_text("Hello\n")
    result = prepare(unchanged, "--input", str(tmp_path / "one.txt"), "--output", str(unchanged / "small"),
                     "--tokenizer", str(unchanged / "small" / "tokenizer.model"))
    assert_user_error(result, "too few to hold out a validation split")


def test_parquet_text_column_of_numbers(unchanged, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    result = prepare(unchanged, "--input", str(tmp_path / "n.parquet"), "--output", str(unchanged / "data"))
    assert_user_error(result, "column 'text' holds int64, not strings")


def test_vocab_too_large_for_corpus(unchanged):
    result = prepare(unchanged, "--input", str(unchanged / "small_src"), "--output", str(unchanged / "small"),
                     "--vocab-size", "50000")
    assert_user_error(result, "tokenizer training failed", "lower --vocab-size")


def test_unknown_config_key(unchanged):
    assert_user_error(train(unchanged, "model.n_layer=3"), "unknown config key 'model.n_layer'", "model.n_layers")


def test_wrong_type(unchanged):
    assert_user_error(train(unchanged, "training.steps=ten"), "training.steps expects int, got 'ten'")


def test_heads_do_not_divide_dim(unchanged):
    assert_user_error(train(unchanged, "model.n_heads=5"), "model.n_heads=5 does not divide model.dim=64")


def test_kv_heads_do_not_divide_heads(unchanged):
    assert_user_error(train(unchanged, "model.n_kv_heads=3"), "model.n_kv_heads=3 does not divide model.n_heads=4")


def test_seq_len_larger_than_data(unchanged):
    result = train(unchanged, f"data.dir={unchanged / 'small'}", "data.seq_len=4096", "model.max_seq_len=4096")
    assert_user_error(result, "data.seq_len=4096 is larger than the training data")


def test_tokenizer_vocab_larger_than_model(unchanged):
    assert_user_error(train(unchanged, "model.vocab_size=100"), "has 512 tokens but model.vocab_size=100")


def test_output_dir_is_a_file(unchanged):
    assert_user_error(train(unchanged, f"run.output_dir={unchanged / 'a_file'}"), "is a file, not a directory")


def _split_file(d, split):
    """The (first non-empty) token file of `split`, in format 1 or 2."""
    files = split_files(d, json.loads((d / "meta.json").read_text()), split)
    return next(p for p in files if p.stat().st_size > 0)


def _truncate_val(d):
    with open(_split_file(d, "val"), "r+b") as f:
        f.truncate(100)


def _edit_meta(**changes):
    def edit(d):
        meta = json.loads((d / "meta.json").read_text())
        meta.update(changes)
        (d / "meta.json").write_text(json.dumps(meta))
    return edit


def _garbage_tokens(d):
    path = _split_file(d, "train")
    path.write_bytes(b"\xff" * path.stat().st_size)


@pytest.mark.parametrize("damage,message", [
    (_truncate_val, "val.bin of 100 bytes where meta.json says"),
    (_edit_meta(dtype="float16"), "invalid dtype or vocab_size"),
    (_edit_meta(vocab_size=100), "vocab_size of 100 but its tokenizer has 512 pieces"),
    (_edit_meta(val_unigram_entropy=None), "without val_unigram_entropy"),
    (lambda d: (d / "meta.json").write_text("[]"), "has no readable meta.json"),
    (lambda d: (d / "tokenizer.model").write_bytes(b"junk"), "tokenizer.model that is not the one"),
    (_garbage_tokens, "holds token id 65535, outside the vocabulary of 512"),
])
def test_damaged_data_dir(unchanged, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(unchanged / "data", broken)
    damage(broken)
    assert_user_error(train(unchanged, f"data.dir={broken}"), message, "prepare-data")


def test_data_dir_not_prepared(unchanged, tmp_path):
    assert_user_error(train(unchanged, f"data.dir={tmp_path}"), "has no readable meta.json", "normtron prepare-data")


def test_missing_config_file(unchanged, tmp_path):
    assert_user_error(train(unchanged, config=str(tmp_path / "none.yaml")), "does not exist")


def test_resume_with_a_different_model(unchanged):
    assert_user_error(train(unchanged, "model.n_layers=3"), "holds a run with a different model",
                      "model.n_layers: 2 -> 3")


def test_resume_with_a_different_sequence_length(unchanged):
    """The data position in the checkpoint no longer fits: refuse, and leave config.yaml as it was."""
    assert_user_error(train(unchanged, "data.seq_len=16"), "resume with the same data and data.seq_len")


def test_check_mode_reports_errors_and_writes_nothing(unchanged):
    args = ["train", "--check", TINY, f"data.dir={unchanged / 'data'}", f"run.output_dir={unchanged / 'runs'}",
            *MICRO_MODEL]
    ok = run_cli(*args, "run.name=fresh")
    assert "config OK for 1 rank(s)" in ok.stdout and not (unchanged / "runs" / "fresh").exists()
    assert "will resume" in run_cli(*args, "run.name=done").stdout
    assert_user_error(run_cli(*args, "--world-size", "3", check=False), "multiple of data-parallel ranks (3)")


@pytest.mark.parametrize("overrides,message", [
    (["parallel.backend=fsdp", "parallel.dp_shard=2", "training.batch_size=12"],
     "dp_shard (2) x tp (1) must equal the 3 launched ranks"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=4"], "parallel.zero_stage=4 is not allowed; choose one of 0"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=1", "parallel.offload_params=true"],
     "parallel.offload_params needs parallel.zero_stage=3"),
])
def test_impossible_parallel_layouts(unchanged, overrides, message):
    args = ["train", "--check", "--world-size", "3", TINY, f"data.dir={unchanged / 'data'}",
            f"run.output_dir={unchanged / 'runs'}", *MICRO_MODEL, *overrides]
    assert_user_error(run_cli(*args, check=False), message)


@pytest.mark.parametrize("overrides,message", [
    (["model.layer_placements=ngpt,pre"], "mixes ngpt with other placements; nGPT keeps every hidden state"),
    (["model.placement=ngpt", "model.qk_norm=true"], "model.qk_norm=true does not apply to placement ngpt"),
])
def test_ngpt_combinations_it_cannot_run(unchanged, overrides, message):
    args = ["train", "--check", TINY, f"data.dir={unchanged / 'data'}", f"run.output_dir={unchanged / 'runs'}",
            *MICRO_MODEL, *overrides]
    assert_user_error(run_cli(*args, check=False), message)


def test_deepspeed_checkpoint_that_is_not_one(unchanged, tmp_path):
    """`convert consolidate` refuses what it cannot read, and never writes a half output."""
    ckpt = unchanged / "runs" / "done" / "checkpoints" / "step_00000002"
    assert_user_error(run_cli("convert", "consolidate", str(ckpt), str(tmp_path / "out"), check=False),
                      "is a DCP checkpoint, which is already layout-independent")
    assert_user_error(run_cli("convert", "consolidate", str(tmp_path), str(tmp_path / "out"), check=False),
                      "is not a checkpoint directory")
    fake = tmp_path / "step_00000001"
    fake.mkdir()
    (fake / "mp_rank_00_model_states.pt").write_bytes(b"torn")
    assert_user_error(run_cli("convert", "consolidate", str(fake), str(tmp_path / "out"), check=False),
                      "cannot read the DeepSpeed checkpoint")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def _copy_run(root, tmp_path, name):
    shutil.copytree(root / "runs" / "done", tmp_path / "runs" / name)
    return tmp_path / "runs" / name


def train_copy(root, tmp_path, name, *overrides):
    return run_cli("train", TINY, f"data.dir={root / 'data'}", f"run.output_dir={tmp_path / 'runs'}",
                   f"run.name={name}", *MICRO_MODEL, "training.steps=3", *overrides, check=False)


def test_damaged_checkpoint(unchanged, tmp_path):
    run = _copy_run(unchanged, tmp_path, "torn")
    newest = run / "checkpoints" / "step_00000002"
    data_file = next(newest.glob("*.distcp"))
    with open(data_file, "r+b") as f:
        f.truncate(1000)
    before = tree_digest(run)
    assert_user_error(train_copy(unchanged, tmp_path, "torn"),  # found by its checksums.json before loading
                      f"checkpoint {newest} is damaged: {data_file} is truncated (1,000 of ")
    assert tree_digest(run) == before


@pytest.mark.parametrize("damage,message", [
    (lambda run: (run / "config.yaml").write_text("model: {dim: ["), "config.yaml is damaged"),
    (lambda run: (run / "config.yaml").write_text("- 1\n"), "config.yaml is damaged"),
    (lambda run: (shutil.rmtree(run / "checkpoints"), (run / "checkpoints").write_text("x")),
     "checkpoints should be a directory"),
    (lambda run: ((run / "metrics.jsonl").unlink(), (run / "metrics.jsonl").mkdir()),
     "metrics.jsonl should be a file"),
])
def test_damaged_run_directory(unchanged, tmp_path, damage, message):
    run = _copy_run(unchanged, tmp_path, "messy")
    damage(run)
    before = tree_digest(run)
    assert_user_error(train_copy(unchanged, tmp_path, "messy"), message)
    assert tree_digest(run) == before


def test_failed_commands_leave_no_empty_directories(unchanged, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = prepare(unchanged, "--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "a" / "b"))
    assert_user_error(result, "empty")
    assert not (tmp_path / "a").exists()
    assert_user_error(train_copy(unchanged, tmp_path, "new", f"data.dir={tmp_path / 'nowhere'}"), "does not exist")
    assert not (tmp_path / "runs").exists()


def test_download_cache_dir_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert_user_error(run_cli("download-corpus", "shakespeare", "--cache-dir", str(tmp_path / "f"), check=False))


@pytest.mark.parametrize("command", ["train", "plan"])
def test_a_command_without_its_config_says_so(command):
    result = run_cli(command, *(["--gpus", "2"] if command == "plan" else []), check=False)
    assert_user_error(result, f"normtron {command} needs a config: a YAML file, or a shipped config's name")


def test_check_warns_when_the_run_ends_before_its_warmup(micro_args):
    out = run_cli("train", "--check", TINY, *micro_args("short", "training.steps=40", "training.warmup_steps=50")).stdout
    assert "warning: training.warmup_steps=50 is longer than training.steps=40: the run ends still warming up" in out


def test_overrides_before_the_config_get_the_order_right():
    result = run_cli("train", "training.steps=5", "tiny", check=False)
    assert_user_error(result, "the config comes first, then the overrides: normtron train tiny training.steps=5")
