"""Config loading: YAML + dotted overrides into typed dataclasses, with errors that name the key."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import REPO

from trainer.config import (all_keys, config_from_dict, config_to_dict, deepspeed_config, dump_config, load_config,
                            micro_batching, pipeline_stages, validate)
from trainer.errors import UserError


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


def test_every_field_is_overridable_and_round_trips():
    cfg = load_config(None)
    data = config_to_dict(cfg)
    assert len(all_keys()) == sum(len(v) for v in data.values())
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert config_to_dict(again) == data


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
    from trainer.train import describe_parallel
    cfg = load_config(None, ["parallel.backend=fsdp", "parallel.tp=2", "model.n_layers=2", *overrides])
    dims = validate(cfg, world_size=4)
    assert ("loss parallel" in describe_parallel(cfg, dims)) == loss_parallel
