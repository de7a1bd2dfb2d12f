"""Bad input: one clear line on stderr, exit code 2, no traceback, and nothing already on disk changed."""

from __future__ import annotations

import shutil

import pytest

from helpers import MICRO_MODEL, TINY, run_cli, tree_digest


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
    assert_user_error(result, "no .txt/.jsonl/.parquet files")


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


def test_truncated_token_file(unchanged, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(unchanged / "data", broken)
    with open(broken / "val.bin", "r+b") as f:
        f.truncate(100)
    assert_user_error(train(unchanged, f"data.dir={broken}"), "val.bin has 100 bytes", "re-run `normtron prepare-data`")


def test_data_dir_not_prepared(unchanged, tmp_path):
    assert_user_error(train(unchanged, f"data.dir={tmp_path}"), "is not a prepared data directory")


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
    assert_user_error(run_cli(*args, "--world-size", "3", check=False), "multiple of ranks (3)")
