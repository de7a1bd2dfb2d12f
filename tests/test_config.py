"""Config loading: YAML + dotted overrides into typed dataclasses, with errors that name the key."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import REPO, TINY, run_cli, run_torchrun, write_lm_eval_tasks

from normtron.trainer.config import (Config, all_keys, config_from_dict, config_to_dict, deepspeed_config, load_config,
                            micro_batching, pipeline_stages, validate)
from normtron.trainer.errors import UserError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 128\n  placement: post\ntraining:\n  lr: 1e-3\n")
    cfg = load_config(path, ["model.placement=peri", "training.steps=7", "model.qk_norm=true",
                             "training.micro_batch_size=null", "run.name=abc"])
    assert cfg.model.dim == 128 and cfg.model.placement == "peri" and cfg.training.steps == 7
    assert cfg.training.lr == 1e-3 and isinstance(cfg.training.lr, float)  # YAML reads 1e-3 as a string
    assert cfg.model.qk_norm is True and cfg.training.micro_batch_size is None and cfg.run.name == "abc"


def test_per_layer_placements_as_yaml_list_or_comma_string(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layers: 3\n  layer_placements: [post, pre, peri]\n")
    assert load_config(path).model.layer_placements == ["post", "pre", "peri"]
    assert load_config(path, ["model.layer_placements=peri,peri,pre"]).model.layer_placements == ["peri", "peri", "pre"]
    with pytest.raises(UserError, match="give exactly one per layer"):
        validate(load_config(path, ["model.layer_placements=post,pre"]))
    with pytest.raises(UserError, match="'mix' is not allowed; choose one of pre, post, peri"):
        load_config(path, ["model.layer_placements=post,mix,pre"])


# A model valid for every layout below (6 layers for 4 pipeline stages, heads and vocabulary divisible by tp=2);
# every model.* value differs from its default. Each run adds the keys its layout needs, and together they
# override every key once with a non-default value, in the CLI syntax a user types.
ROUND_TRIP_MODEL = {
    "model.dim": 64, "model.n_layers": 6, "model.n_heads": 8, "model.n_kv_heads": 2, "model.vocab_size": 520,
    "model.ffn_hidden_dim": 128, "model.ffn_multiple_of": 64, "model.norm": "layernorm", "model.norm_eps": 1e-6,
    "model.norm_bias": False, "model.kernels": "torch", "model.placement": "mix", "model.mix_alpha": 0.5,
    "model.layer_placements": ["post", "pre", "peri", "normformer", "subln", "peri"], "model.qk_norm": True,
    "model.embed_norm": True, "model.normformer_residual_scale": True,
    "model.rope_theta": 500000.0, "model.max_seq_len": 64, "model.init_std": 0.03, "model.depth_scaled_init": False,
    "model.dyt_alpha_init": 0.1, "model.dyt_alpha_init_attn": 0.5, "model.dyt_embed_scale": False,
    "model.parametrization": "mup", "model.mup_base_dim": 32,
}
ROUND_TRIP_RUNS = {  # run name -> (ranks, overrides beyond run.name, run.output_dir and the model)
    "tp_pp": (4, {
        "run.seed": 3, "data.dir": "{data}", "data.seq_len": 32, "data.tokenizer": "{data}/tokenizer.model",
        "data.val_fraction": 0.05,
        "training.steps": 1, "training.batch_size": 8, "training.micro_batch_size": 2, "training.lr": 0.002,
        "training.min_lr_ratio": 0.2, "training.schedule": "wsd", "training.warmup_steps": 0,
        "training.decay_fraction": 0.5, "training.weight_decay": 0.05, "training.beta1": 0.8, "training.beta2": 0.9,
        "training.adam_eps": 1e-7, "training.grad_clip": 0.5, "training.fp8_recipe": "rowwise",
        "training.fp8_emulate": True,
        "checkpoint.every": 1, "checkpoint.keep_last": 1, "checkpoint.async": True, "eval.every": 1, "eval.steps": 1,
        "logging.every": 1, "logging.tensorboard": False, "logging.peak_tflops": 100.0, "diagnostics.every": 1,
        "stability.nonfinite": "skip", "stability.spike_window": 5, "stability.spike_zscore": 3.0,
        "stability.z_loss": 1e-4,
        "parallel.backend": "fsdp", "parallel.tp": 2, "parallel.pp": 2, "parallel.dp_shard": 1,
        "parallel.sequence_parallel": False, "parallel.loss_parallel": False, "parallel.pp_schedule": "Interleaved1F1B",
        "parallel.pp_stages_per_rank": 2, "parallel.pp_layers": [2, 1, 1, 2], "parallel.activation_checkpoint": "full",
        "parallel.reshard_after_forward": False}),
    "zero3_offload": (2, {
        "data.sources": [{"dir": "{data}", "weight": 2.0, "name": "shakespeare"}], "data.seq_len": 32,
        "training.steps": 1, "training.batch_size": 8, "eval.steps": 1, "model.tie_embeddings": True,
        "parallel.backend": "deepspeed", "parallel.zero_stage": 3, "parallel.offload_params": True,
        "parallel.offload_optimizer": True, "deepspeed.wall_clock_breakdown": True,
        "stability.nonfinite": "rollback", "stability.on_spike": "rollback", "stability.rollback_skip_batches": 5,
        "stability.max_rollbacks": 2, "stability.rollback_window": 50, "checkpoint.on_damaged": "previous",
        "debug.nan_at_step": 1000, "debug.spike_at_step": 999,
        "logging.wandb": "offline", "logging.wandb_project": "p", "logging.wandb_entity": "e",
        "logging.wandb_name": "n", "logging.wandb_group": "g"}),
    "hsdp_compiled_from_tp_pp": (2, {
        "data.dir": "{data}", "data.seq_len": 32, "training.steps": 1, "training.batch_size": 8, "eval.steps": 1,
        "training.precision": "bf16", "checkpoint.init_from": "{runs}/tp_pp/checkpoints/step_00000001",
        "parallel.backend": "fsdp", "parallel.dp_replicate": 2, "parallel.dp_shard": 1, "parallel.compile": True,
        "training.optimizer": "muon", "training.muon_lr": 0.01, "training.muon_momentum": 0.9,
        "training.muon_nesterov": False, "training.muon_ns_steps": 4, "training.muon_adjust_lr_fn": "original",
        "training.muon_weight_decay": 0.01, "training.muon_ns_dtype": "fp32", "training.loss_chunk_size": 64,
        "eval.tasks": ["shakespeare_mc"], "eval.tasks_every": 1, "eval.tasks_include_path": "{runs}/tasks",
        "eval.tasks_limit": 2, "eval.tasks_num_fewshot": 1, "eval.tasks_batch_size": 2}),
}


def test_every_field_is_overridable_and_round_trips(shakespeare_data, tmp_path):
    """Every config key, set on the command line to a value other than its default, is what the run directory's
    config.yaml says after a real 1-step run (three layouts, since no single one accepts every key)."""
    defaults, runs = config_to_dict(Config()), {}
    write_lm_eval_tasks(tmp_path / "tasks", [{"context": "To be, or", "choices": [" not to be", " Denmark"],
                                              "label": 0, "text": "To be, or not to be"}] * 3)
    for name, (nproc, overrides) in ROUND_TRIP_RUNS.items():
        wanted = {"run.name": name, "run.output_dir": str(tmp_path), **ROUND_TRIP_MODEL, **overrides}
        runs[name] = nproc, {k: _fill(v, data=shakespeare_data, runs=tmp_path) for k, v in wanted.items()}
    covered = {key for _, wanted in runs.values() for key in wanted}
    assert set(all_keys()) <= covered, f"keys no run overrides: {sorted(set(all_keys()) - covered)}"
    for _, wanted in runs.values():
        for key, value in wanted.items():
            section, field = key.split(".", 1)
            assert defaults[section].get(field) != value, f"{key}={value!r} is its default: not a test of it"

    for name, (nproc, wanted) in runs.items():
        args = ["train", TINY, *(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in wanted.items())]
        run_cli(*args) if nproc == 1 else run_torchrun(nproc, *args)
        saved = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        for key, value in wanted.items():
            section, field = key.split(".", 1)
            assert saved[section][field] == value, (name, key, saved[section][field], value)
        assert config_to_dict(config_from_dict(saved)) == saved  # and the file reads back as the same config


def _fill(value, **paths):
    """`value` with {data} and {runs} replaced by the test's paths, inside lists and mappings too."""
    if isinstance(value, str):
        return value.format(**paths)
    if isinstance(value, list):
        return [_fill(v, **paths) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, **paths) for k, v in value.items()}
    return value


@pytest.mark.parametrize("override,message", [
    ("model.n_layer=3", "unknown config key 'model.n_layer' (did you mean 'model.n_layers'?)"),
    ("trainng.lr=1", "unknown config key 'trainng.lr' (did you mean 'training.lr'?)"),
    ("training.steps=abc", "training.steps expects int, got 'abc' (str)"),
    ("training.steps=1.5", "training.steps expects int"),
    ("model.qk_norm=3", "model.qk_norm expects bool"),
    ("model.dim=true", "model.dim expects int"),
    ("model.placement=sandwich", "model.placement='sandwich' is not allowed; choose one of pre, post, peri, mix"),
    ("model.norm=batchnorm", "choose one of rmsnorm, layernorm"),
    ("training.schedule=linear", "choose one of cosine, wsd, constant"),
    ("model.dim=null", "model.dim must not be null"),
    ("training.lr", "is not of the form section.key=value"),
    ("training.grad_clip=-1", "training.grad_clip=-1.0 must be >= 0"),
    ("training.beta1=1.5", "training.beta1=1.5 must be < 1"),
    ("training.adam_eps=0", "training.adam_eps=0.0 must be > 0"),
    ("training.lr=.nan", "training.lr expects float, got nan"),
    ("training.lr=.inf", "training.lr expects float, got inf"),
    ("model.mix_alpha=1.5", "model.mix_alpha=1.5 must be <= 1"),
    ("model.max_seq_len=2000000000", "model.max_seq_len=2000000000 must be <= 1048576"),
    ("run.seed=-1", "run.seed=-1 must be >= 0"),
    ("run.seed=99999999999999999999999", "must be < 9223372036854775808"),
    ("training.micro_batch_size=0", "training.micro_batch_size=0 must be >= 1"),
    ("logging.peak_tflops=-1", "logging.peak_tflops=-1.0 must be > 0"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["model.dim=100", "model.n_heads=3"], "model.n_heads=3 does not divide model.dim=100"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_kv_heads=3 does not divide model.n_heads=4"),
    (["model.dim=36", "model.n_heads=4"], "RoPE needs an even head size"),
    (["model.parametrization=mup"], "model.parametrization=mup needs model.mup_base_dim"),
    (["model.parametrization=mup", "model.mup_base_dim=30", "model.n_heads=4"], "divisible by model.n_heads=4"),
    (["training.batch_size=6"], "training.batch_size=6 must be a multiple of data-parallel ranks (4)"),
    (["training.batch_size=8", "training.micro_batch_size=3"], "must be a multiple of data-parallel ranks (4)"),
    (["training.batch_size=2", "parallel.backend=deepspeed"], "must be a multiple of data-parallel ranks (4)"),
    (["parallel.backend=fsdp", "parallel.tp=2", "training.batch_size=3"],
     "must be a multiple of data-parallel ranks (2)"),
    (["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_seq_len=2048"),
    (["parallel.tp=2"], "parallel.tp=2 / parallel.pp=1 need parallel.backend=fsdp"),
    (["parallel.backend=deepspeed", "parallel.pp=2"], "need parallel.backend=fsdp"),
    (["parallel.backend=fsdp", "parallel.tp=4", "model.n_heads=8", "model.n_kv_heads=2"],
     "model.n_kv_heads=2 does not divide by parallel.tp=4"),
    (["parallel.backend=fsdp", "parallel.tp=4", "model.n_heads=2", "model.dim=64"],
     "model.n_heads=2 does not divide by parallel.tp=4"),
    (["parallel.backend=fsdp", "parallel.tp=4", "model.vocab_size=1001"],
     "model.vocab_size=1001 does not divide by parallel.tp=4"),
    (["parallel.backend=fsdp", "parallel.tp=4", "data.seq_len=30"],
     "data.seq_len=30 does not divide by parallel.tp=4, which sequence parallelism needs"),
    (["parallel.backend=fsdp", "parallel.tp=3"], "must equal the 4 launched ranks"),
    (["parallel.dp_shard=2"], "pp (1) x dp_replicate (1) x dp_shard (2) x tp (1) must equal the 4 launched ranks"),
    (["parallel.backend=fsdp", "parallel.dp_replicate=3"], "must equal the 4 launched ranks"),
    (["parallel.dp_shard=0"], "parallel.dp_shard=0 must be >= 1, or -1"),
    (["parallel.dp_replicate=2"], "parallel.dp_replicate=2 (HSDP) needs parallel.backend=fsdp"),
    (["parallel.backend=fsdp", "parallel.zero_stage=2"], "parallel.zero_stage=2 applies to parallel.backend=deepspeed"),
    (["parallel.offload_params=true"], "CPU offload needs parallel.backend=fsdp or deepspeed"),
    pytest.param(["parallel.backend=fsdp", "parallel.offload_params=true"],
                 "without a GPU they are in host memory already",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="offload is valid where a GPU exists")),
    (["parallel.backend=fsdp", "parallel.offload_optimizer=true"], "use parallel.offload_params=true instead"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=2", "parallel.offload_params=true"],
     "parallel.offload_params needs parallel.zero_stage=3"),
    (["parallel.backend=deepspeed", "parallel.offload_optimizer=true"], "needs parallel.zero_stage >= 1"),
    (["parallel.backend=deepspeed", "deepspeed.train_batch_size=64"],
     "deepspeed.train_batch_size=64 conflicts with what normtron sets from training.batch_size (32)"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=1", "deepspeed.zero_optimization.stage=3"],
     "deepspeed.zero_optimization.stage=3 conflicts with parallel.zero_stage=1"),
    (["run.name=../escape"], "must be a plain directory name"),
    (["parallel.backend=fsdp", "parallel.pp=2", "model.tie_embeddings=true"],
     "model.tie_embeddings=true cannot be pipelined"),
    (["parallel.backend=fsdp", "parallel.pp=2", "model.n_layers=3", "parallel.pp_schedule=Interleaved1F1B"],
     "model.n_layers=3 is fewer than the 4 pipeline stages (pp 2 x 2 per rank)"),
    (["parallel.backend=fsdp", "parallel.pp=2", "model.n_layers=4", "parallel.pp_layers=3,2"],
     "parallel.pp_layers=3,2 must give one count >= 1 per pipeline stage (2 = pp 2 x 1 per rank) adding up to "
     "model.n_layers=4"),
    (["parallel.backend=fsdp", "parallel.pp=2", "model.n_layers=4", "parallel.pp_layers=4,0"],
     "must give one count >= 1 per pipeline stage"),
    (["parallel.backend=fsdp", "parallel.pp=2", "parallel.pp_schedule=GPipe", "parallel.pp_stages_per_rank=2"],
     "parallel.pp_schedule=GPipe runs one stage per rank"),
    (["parallel.backend=fsdp", "parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "parallel.pp_stages_per_rank=3"],
     "parallel.pp_schedule=ZBVZeroBubble runs exactly 2 stages per rank"),
    (["parallel.backend=fsdp", "parallel.pp=2", "training.batch_size=8", "training.micro_batch_size=4"],
     "parallel.pp_schedule=1F1B needs at least parallel.pp=2 micro-batches per step; got 1"),
    (["parallel.backend=fsdp", "parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "training.batch_size=10",
      "training.micro_batch_size=1"],
     "needs the micro-batches per step (5) to be a multiple of 2"),
    (["parallel.backend=fsdp", "parallel.pp=3"], "must equal the 4 launched ranks"),
    (["stability.on_spike=rollback", "stability.spike_window=0"],
     "stability.on_spike=rollback needs loss-spike detection; set stability.spike_window > 0"),
])
def test_validation_names_the_key(overrides, message):
    with pytest.raises(UserError) as err:
        validate(load_config(None, overrides), world_size=4)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides", [[], ["parallel.dp_replicate=4", "parallel.dp_shard=1"],
                                       ["parallel.dp_replicate=2"], ["parallel.dp_shard=4"]])
def test_data_parallel_degrees_that_fill_the_world(overrides):
    validate(load_config(None, ["parallel.backend=fsdp", *overrides]), world_size=4)


@pytest.mark.parametrize("schedule,per_rank,local_batch,expected", [
    ("1F1B", None, 8, (4, 2)),             # as many micro-batches as stages
    ("Interleaved1F1B", None, 8, (2, 4)),  # 2 stages per rank by default: 4 stages
    ("GPipe", None, 6, (3, 2)),
    ("ZBVZeroBubble", None, 6, (1, 6)),    # 4 stages do not divide 6: the next count that does
    ("Interleaved1F1B", 3, 4, (1, 4)),     # fewer sequences than the 6 stages: one sequence each
])
def test_pipeline_microbatches_default_to_the_stage_count(schedule, per_rank, local_batch, expected):
    cfg = load_config(None, ["parallel.backend=fsdp", "parallel.pp=2", f"parallel.pp_schedule={schedule}",
                             f"parallel.pp_stages_per_rank={per_rank or 'null'}", f"training.batch_size={2 * local_batch}",
                             "model.n_layers=8"])
    validate(cfg, world_size=4)
    assert micro_batching(cfg.training, 2, pipeline_stages(cfg)) == expected


def test_deepspeed_section_passes_through_and_merges(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  backend: deepspeed\n  zero_stage: 2\n"
                    "deepspeed:\n  zero_optimization:\n    overlap_comm: false\n")
    cfg = load_config(path, ["deepspeed.zero_optimization.reduce_bucket_size=1000000", "training.batch_size=8",
                             "training.micro_batch_size=2"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 1000000}
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    with pytest.raises(UserError, match="cannot set .zero_optimization.overlap_comm.x."):
        load_config(path, ["deepspeed.zero_optimization.overlap_comm.x=1"])


def test_lenient_but_exact_parsing(tmp_path):
    cfg = load_config(None, ["training.steps=1e3", "run.name=2024-01-01", "training.lr=3e-4"])
    assert cfg.training.steps == 1000 and cfg.run.name == "2024-01-01" and cfg.training.lr == 3e-4
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  # name: x\nmodel:\n  dim: 64\n")  # an all-commented section is empty, not an error
    assert load_config(path).model.dim == 64
    path.write_text("model:\n  dim: 64\n  dim: 128\n")
    with pytest.raises(UserError, match="key 'dim' appears twice"):
        load_config(path)


def test_unknown_section_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  dim: 8\n")
    with pytest.raises(UserError, match="unknown config key 'modle' \\(did you mean 'model'\\?\\)"):
        load_config(path)


@pytest.mark.parametrize("name", ["tiny", "125m", "350m", "1b", "3b", "7b"])
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    validate(cfg, world_size=1)
    assert cfg.run.name


@pytest.mark.parametrize("overrides,loss_parallel", [
    ([], True),
    (["stability.z_loss=1e-4"], False),  # the z-loss needs the whole logits
    (["parallel.pp=2", "parallel.dp_shard=1", "model.tie_embeddings=false"], False),  # the schedule's loss too
    (["parallel.loss_parallel=false"], False),
])
def test_the_parallel_summary_says_loss_parallel_exactly_when_it_is_used(overrides, loss_parallel):
    from normtron.trainer.train import describe_parallel
    cfg = load_config(None, ["parallel.backend=fsdp", "parallel.tp=2", "model.n_layers=2", *overrides])
    dims = validate(cfg, world_size=4)
    assert ("loss parallel" in describe_parallel(cfg, dims)) == loss_parallel
