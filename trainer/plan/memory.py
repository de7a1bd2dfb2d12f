"""Per-rank memory of a training run, term by term: model states (parameters, gradients, optimizer state) for each
backend, the backends' own buffers, activations, and the logits and loss buffers.

Every figure is bytes on the most loaded rank at the peak of a step in steady state (gradients and optimizer state
already exist, as from the second step on). Activations count the tensors autograd saves, derived op by op from
models/transformer.py and models/norms.py with PyTorch ops (kernels=torch; the fused Triton norms on a GPU save
less, so there this over-estimates the norms' share), and checked against a CPU step in tests/test_plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from normtron.models.transformer import Transformer
from normtron.parallel.mesh import ParallelDims
from normtron.parallel.pipeline import ZERO_BUBBLE_SCHEDULES, layers_per_stage, stage_indices, stages_per_rank
from normtron.trainer.config import Config, deepspeed_config, micro_batching, pipeline_stages
from normtron.trainer.engine import loss_chunk_size

# DeepSpeed's defaults for the zero_optimization keys that size its buffers, in elements (DeepSpeedZeroConfig,
# deepspeed/runtime/zero/config.py; tests/test_plan.py reads them from DeepSpeed)
DEEPSPEED_BUCKET = 500_000_000        # reduce_bucket_size
DEEPSPEED_MAX_LIVE = 1_000_000_000    # stage3_max_live_parameters
COMMUNICATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # DeepSpeed's communication_data_type values


@dataclass
class ParamCounts:
    """Parameters of the whole model by where they sit; `linear` and `embedding` are exact formulas, `small` (norm
    weights, gains, scales: 0.01% of a 7B model) is read from the model built on the meta device."""
    embedding: int
    head: int                    # 0 with tied embeddings
    layer_linear: int            # one block's q, k, v, o, gate, up, down
    layer_small: list[int]       # each block's norm weights and gains
    outer_small: int             # final norm, embedding norm and scales

    @property
    def total(self) -> int:
        return self.embedding + self.head + len(self.layer_small) * self.layer_linear + sum(self.layer_small) \
            + self.outer_small


_COUNTS: dict[str, ParamCounts] = {}  # by the model section's repr: --search plans one model many times


def count_params(cfg: Config) -> ParamCounts:
    key = repr(cfg.model)
    if key not in _COUNTS:
        _COUNTS[key] = _count_params(cfg)
    return _COUNTS[key]


def _count_params(cfg: Config) -> ParamCounts:
    m = cfg.model
    q, kv = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    linear = m.dim * (q + 2 * kv) + q * m.dim + 3 * m.dim * m.hidden_dim
    with torch.device("meta"):
        model = Transformer(m)
    small = lambda module: sum(p.numel() for name, p in module.named_parameters()  # noqa: E731
                               if not any(name.endswith(f"{proj}.weight") for proj in _LINEARS))
    layers = [small(block) for block in model.layers.values()]
    outer = sum(p.numel() for name, p in model.named_parameters()
                if not name.startswith(("layers.", "tok_embeddings.", "output.")))
    return ParamCounts(m.vocab_size * m.dim, 0 if m.tie_embeddings else m.vocab_size * m.dim, linear, layers, outer)


_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""


@dataclass
class RankMemory:
    pp_rank: int
    params: int                       # parameters this rank computes with (after pp and tp division)
    terms: list[Term] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    def get(self, prefix: str) -> float:
        return sum(t.bytes for t in self.terms if t.name.startswith(prefix))


def compute_mode(cfg: Config) -> str:
    """How the block computes: fp32; autocast (fp32 weights and stream, bf16 matmuls: one process and DDP); or bf16
    (bf16 weights: FSDP2's param_dtype, DeepSpeed's bf16 mode)."""
    if cfg.training.precision == "fp32":
        return "fp32"
    return "autocast" if cfg.parallel.backend == "ddp" else "bf16"


def layer_activation_bytes_per_token(cfg: Config, dims: ParallelDims) -> float:
    """Bytes autograd saves per token of one block without activation checkpointing (per rank under tp).

    Per block, Pre-LN with its two norms, as the ops save them: each norm its input, 1/rms and output (fp32 math)
    and the matmul input; RoPE its cos/sin for q and k; SDPA q, k, v (k and v expanded to all heads), its output
    and logsumexp; SwiGLU gate, up, silu(gate) and the product. Under tp the heads and the MLP columns divide by
    tp, and with sequence parallelism the norms' tokens too."""
    m, tp = cfg.model, dims.tp
    d, h, hd, nh = m.dim, m.hidden_dim, m.head_dim, m.n_heads
    q = nh * hd
    sp = tp if cfg.parallel.sequence_parallel and tp > 1 else 1
    n_norms = 2 + _extra_norms_per_layer(cfg)
    mode = compute_mode(cfg)
    if mode == "fp32":
        norms = n_norms * (3 * d + 1) * 4 / sp
        return norms + (16 * hd + (16 * q + 4 * nh + 16 * h) / tp)
    if mode == "bf16":  # norm: fp32 copy of the input, fp32 output, 1/rms; bf16 matmul input
        norms = n_norms * (8 * d + 4) / sp + n_norms * 2 * d
        return norms + 8 * hd + (8 * q + 4 * nh + 8 * h) / tp
    # autocast: the norms read the fp32 stream itself; each linear keeps its own bf16 cast of its input (q, k, v:
    # three; gate, up: two); RoPE stays fp32
    norms = n_norms * (8 * d + 4) / sp + 10 * d
    return norms + 16 * hd + (8 * q + 4 * nh + 8 * h) / tp


def _extra_norms_per_layer(cfg: Config) -> int:
    """Norms over the residual width beyond Pre-LN's two (Peri-LN's output norms, Post-LN's are instead of)."""
    from normtron.models.placement import layer_wiring
    wiring = layer_wiring(cfg.model, 0)
    count = sum(getattr(wiring.branch(b), k) for b in ("attention", "mlp")
                for k in ("input_norm", "output_norm", "post_norm"))
    return max(count - 2, 0)


def checkpointed_layer_bytes_per_token(cfg: Config, dims: ParallelDims) -> float:
    """What a checkpointed block keeps per token: `full` its inputs (the stream and the pending residual add);
    `selective` also every matmul's and attention's output."""
    m, tp = cfg.model, dims.tp
    stream = 2 if compute_mode(cfg) == "bf16" else 4
    sp = tp if cfg.parallel.sequence_parallel and tp > 1 else 1
    kept = 2 * m.dim * stream / sp
    if cfg.parallel.activation_checkpoint == "selective":
        matmul = 4 if compute_mode(cfg) == "fp32" else 2
        q, kv = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
        kept += (matmul * (q + 2 * kv + 2 * m.hidden_dim + q) + 4 * m.n_heads) / tp + 2 * matmul * m.dim / sp
    return kept


def loss_buffer_bytes(cfg: Config, dims: ParallelDims, tokens: int) -> tuple[float, str]:
    """Peak of the head and loss for one micro-batch of `tokens`: the logits and the cross entropy's fp32 copies
    and gradients (unchunked), or one chunk's logits plus the hidden-state and head-weight gradient buffers
    (training.loss_chunk_size, trainer/chunked_loss.py)."""
    m = cfg.model
    vocab = m.vocab_size / (dims.tp if dims.tp > 1 and cfg.parallel.loss_parallel and dims.pp == 1 else 1)
    chunk = loss_chunk_size(cfg)
    stream = 2 if compute_mode(cfg) == "bf16" else 4
    if chunk:
        rows = min(chunk, tokens)
        matmul = 4 if compute_mode(cfg) == "fp32" else 2
        per_chunk = rows * m.vocab_size * (4 + (matmul if matmul != 4 else 0) + 4)  # logits (+ fp32 copy), grad
        buffers = tokens * m.dim * stream + m.vocab_size * m.dim * 4  # grad of hidden states, fp32 grad of weight
        return per_chunk + buffers, f"chunks of {chunk} tokens: one chunk's logits and gradient, d hidden, d head"
    # unchunked, at the peak (the cross entropy's backward): the logits, the log-softmax the cross entropy saved, the
    # gradient of the log-softmax and of the logits, fp32 (16 B/token/vocab entry); in bf16 the logits are bf16
    # and their fp32 copy is gone by then (2 + 4 + 4 + 4)
    per_token = 16 if compute_mode(cfg) == "fp32" else 14
    return tokens * vocab * per_token, "logits, log-softmax and both their gradients (the cross entropy's backward)"


def in_flight_microbatches(cfg: Config, pp_rank: int, n_micro: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak, in units of the rank's whole share of
    layers: GPipe all of them; 1F1B pp - rank (its warm-up plus one); the interleaved schedules (torch's warm-up:
    (v-1)·pp + 2·(pp-1-rank) + 1 virtual-stage steps, each 1/v of the rank's layers); ZBV as interleaved."""
    p = cfg.parallel
    if p.pp == 1:
        return 1
    v = stages_per_rank(p.pp_schedule, p.pp_stages_per_rank)
    if p.pp_schedule == "GPipe":
        return n_micro
    if p.pp_schedule == "1F1B":
        return min(p.pp - pp_rank, n_micro)
    steps = (v - 1) * p.pp + 2 * (p.pp - 1 - pp_rank) + 1
    return min(steps, n_micro * v) / v


def rank_memory(cfg: Config, dims: ParallelDims, counts: ParamCounts, pp_rank: int = 0) -> RankMemory:
    p, t, m = cfg.parallel, cfg.training, cfg.model
    tp, shard = dims.tp, dims.dp_shard
    n_stages = pipeline_stages(cfg)
    per_stage = layers_per_stage(m.n_layers, n_stages, p.pp_layers)
    stages = stage_indices(pp_rank, p.pp, n_stages // p.pp, p.pp_schedule) if p.pp > 1 else [0]
    layer_ids = [sum(per_stage[:s]) + i for s in stages for i in range(per_stage[s])]
    first, last = 0 in stages, n_stages - 1 in stages
    block_params = counts.layer_linear / tp + max(counts.layer_small)
    params = (len(layer_ids) * counts.layer_linear / tp + sum(counts.layer_small[i] for i in layer_ids)
              + (counts.embedding / tp if first else 0) + (counts.head / tp if last else 0)
              + (counts.outer_small if last else 0))
    root_params = (counts.embedding if first else 0) / tp + (counts.head / tp + counts.outer_small if last else 0)
    mem = RankMemory(pp_rank, round(params))
    compute_bytes = 4 if t.precision == "fp32" else 2
    muon_fraction = len(layer_ids) * counts.layer_linear / tp / params if t.optimizer == "muon" else 0.0
    moments = 8 * (1 - muon_fraction) + 4 * muon_fraction  # AdamW two fp32 moments; Muon one for its matrices
    add = lambda name, value, note="": mem.terms.append(Term(name, value, note))  # noqa: E731

    if p.backend == "ddp":
        add("parameters", 4 * params, "fp32")
        add("gradients", 4 * params, "fp32")
        add("optimizer state", moments * params, "fp32 moments")
        # DDP's reducer buckets: no separate copy measured on torch 2.13 (bench/plan_accuracy.py, row ddp2): the
        # gradients, allocated fresh each step (zero_grad(set_to_none)), are views into them
    elif p.backend == "fsdp":
        on_gpu = 0 if p.offload_params else 1
        add("parameters", on_gpu * 4 * params / shard, f"fp32 shard 1/{shard}" + (" (offloaded)" * (1 - on_gpu)))
        add("gradients", on_gpu * 4 * params / shard, f"fp32 shard 1/{shard}")
        add("optimizer state", on_gpu * moments * params / shard, f"fp32 moments, shard 1/{shard}")
        # FSDP2 computes on gathered copies even over one shard (dp_shard=1 under tp or pp)
        keep_all = not p.reshard_after_forward or p.pp_schedule in ZERO_BUBBLE_SCHEDULES and p.pp > 1
        gathered_blocks = len(layer_ids) if keep_all else min(2, len(layer_ids))
        add("buffers: FSDP2 all-gather", compute_bytes * (root_params + gathered_blocks * block_params),
            f"gathered {'all' if keep_all else 'current + prefetched'} blocks and the root (embedding/head) in "
            f"{'bf16' if compute_bytes == 2 else 'fp32'}")
        # unsharded gradients of the largest FSDP unit (the root: embedding and head) before their reduce-scatter,
        # in the compute dtype and cast to fp32 (reduce_dtype)
        add("buffers: FSDP2 reduce-scatter", (4 + (compute_bytes if compute_bytes != 4 else 0))
            * max(root_params, block_params), "the largest unit's unsharded gradients (compute dtype + fp32)")
    else:  # deepspeed: bf16 (or fp32) weights and gradients, an fp32 master partition and the moments
        n, stage = dims.world_size, p.zero_stage
        weights = 2 if t.precision == "bf16" else 4
        optim = 4 + moments
        w_div, g_div, o_div = {0: (1, 1, 1), 1: (1, n, n), 2: (1, n, n), 3: (n, n, n)}[stage]
        add("parameters", 0 if p.offload_params else weights * params / w_div,
            f"{'bf16' if weights == 2 else 'fp32'}" + (f", partition 1/{n}" if w_div > 1 else ""))
        add("gradients", weights * params / g_div, f"partition 1/{g_div}" if g_div > 1 else "")
        add("optimizer state", 0 if p.offload_optimizer else optim * params / o_div,
            "fp32 master + moments" + (f", partition 1/{o_div}" if o_div > 1 else "")
            + (" (offloaded to CPU)" if p.offload_optimizer else ""))
        ds = deepspeed_config(cfg, n)  # the JSON DeepSpeed gets: normtron's keys and the `deepspeed:` section
        zero = ds["zero_optimization"]
        bucket = float(zero.get("reduce_bucket_size", DEEPSPEED_BUCKET))
        if stage == 3:
            # contiguous_gradients (the default): DeepSpeedZeroOptimizer_Stage3 allocates its gradient bucket whole,
            # reduce_bucket_size elements in the communication dtype (normtron: fp32; DeepSpeed's default: the
            # weights' dtype)
            comm = COMMUNICATION_BYTES.get(str(ds.get("communication_data_type")).lower(), weights)
            add("buffers: DeepSpeed reduce bucket", comm * bucket,
                f"reduce_bucket_size={bucket:.3g} elements in communication_data_type, allocated whole")
            # parameters gathered for the forward are kept for their backward (stage3_max_reuse_distance, 1e9 by
            # default) until stage3_max_live_parameters are resident
            live = min(float(zero.get("stage3_max_live_parameters", DEEPSPEED_MAX_LIVE)), params)
            add("buffers: DeepSpeed gathered parameters", weights * live,
                f"{live:.3g} parameters gathered whole (stage3_max_live_parameters)")
        elif stage in (1, 2) and (zero.get("contiguous_gradients", True) or p.offload_optimizer):
            # DeepSpeedZeroOptimizer.setup_buckets: each backward takes a bucket of reduce_bucket_size elements in
            # the weights' dtype, whole; a second one with overlap_comm (off by default below ZeRO-3)
            copies = 2 if zero.get("overlap_comm", False) else 1
            add("buffers: DeepSpeed reduce bucket", copies * weights * bucket,
                f"{copies} x reduce_bucket_size={bucket:.3g} elements, allocated whole")
    if t.precision == "fp8":
        add("FP8 extras", 2 * counts.layer_linear / tp,
            "one block's weights cast to float8 and transposed (torchao Float8Linear; dynamic scales are scalars)")

    # activations
    micro, n_micro = micro_batching(t, dims.dp_size, n_stages)
    tokens = micro * cfg.data.seq_len
    if p.activation_checkpoint == "none":
        per_layer = layer_activation_bytes_per_token(cfg, dims)
        recompute = 0.0
    else:
        per_layer = checkpointed_layer_bytes_per_token(cfg, dims)
        recompute = layer_activation_bytes_per_token(cfg, dims) * tokens  # one block re-run in backward
    in_flight = in_flight_microbatches(cfg, pp_rank, n_micro)
    stream = 2 if compute_mode(cfg) == "bf16" else 4
    edges = (tokens * 8 if first else 0) + (tokens * m.dim * (3 * 4 + stream) if last else 0)  # ids; final norm
    add("activations", in_flight * (tokens * per_layer * len(layer_ids) + edges),
        f"{len(layer_ids)} blocks x {tokens} tokens x {per_layer:.0f} B/token"
        + (f" x {in_flight:g} micro-batches in flight ({p.pp_schedule})" if p.pp > 1 else "")
        + (f", {p.activation_checkpoint} checkpointing" if p.activation_checkpoint != "none" else ""))
    if t.precision != "fp32" and p.backend == "ddp":
        add("activations: autocast weight copies", 2 * (params - root_params + counts.head / tp * last),
            "bf16 casts of the matmul weights, kept for backward")
    # the loss's buffers and a checkpointed block's recomputation are not held at the same time: the larger counts
    loss, loss_note = loss_buffer_bytes(cfg, dims, tokens) if last else (0.0, "")
    if recompute > loss:
        add("activations: block recomputed", recompute, "one block's activations re-made in backward"
            + (f" (more than the logits/loss buffers, {loss / 2**30:.2f} GiB, held before it)" if last else ""))
    elif last:
        add("logits and loss", loss, loss_note)
    if last and p.pp > 1 and in_flight > 1:  # earlier micro-batches' saved loss tensors wait for their backward
        if loss_chunk_size(cfg):  # the chunked loss saves its hidden-state and fp32 head-weight gradients
            per_micro, what = tokens * m.dim * stream + m.vocab_size * m.dim * 4, "gradient buffers of the chunked loss"
        else:
            per_micro = tokens * m.vocab_size * (8 if compute_mode(cfg) == "fp32" else 6)
            what = "logits and log-softmax"
        add("logits and loss: waiting micro-batches", (in_flight - 1) * per_micro,
            f"{in_flight - 1:g} more micro-batches' {what} ({p.pp_schedule} runs their backward later)")
    return mem


def plan_memory(cfg: Config, dims: ParallelDims) -> list[RankMemory]:
    """Every pipeline rank's memory (one entry without a pipeline)."""
    counts = count_params(cfg)
    return [rank_memory(cfg, dims, counts, r) for r in range(cfg.parallel.pp)]
