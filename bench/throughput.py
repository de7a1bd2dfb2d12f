"""Training-step time of normtron against Hugging Face `LlamaForCausalLM` on the same config and the same weights,
in one process: tokens/s, the median step and the ratio, with the chunked loss off and on.

    python bench/throughput.py                                   # CPU: a small model, fp32, eager
    python bench/throughput.py --dim 512 --layers 8 --seq 512 --batch 4 --loss-chunk 0 1024
    python bench/throughput.py --config configs/1b.yaml --seq 2048 --batch 4    # GPU: bf16 autocast
    python bench/throughput.py model.tie_embeddings=true                        # any config override

normtron's step is `normtron train`'s in one process (trainer/engine.py's TorchEngine: forward and backward, the
chunked loss where training.loss_chunk_size is set, gradient clipping, AdamW, the schedule). The HF model is built
from the same config (trainer/convert/hf/mapping.py: the config `normtron convert to-hf` writes) with normtron's
initialized weights copied in under their HF names, and takes the same step: logits, the same fp32 cross entropy,
clipping, the same AdamW param groups and schedule. Before timing, the two models' logits on the batch must agree.
Both run eagerly (no torch.compile), fp32 on CPU and bf16 autocast over fp32 weights on a GPU. Each variant times
`--steps` steps after `--warmup` untimed ones, all variants in turns (the same machine load for each), and reports
the medians. Only a Llama-shaped model (pre-norm RMSNorm, no QK-norm) has an HF counterpart.

On a GPU, the step time `normtron plan` predicts (trainer/plan, where present) is printed against the measured
one of the first normtron variant.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import timed
from normtron.models.transformer import Transformer
from normtron.parallel.distributed import init_distributed
from normtron.trainer.config import load_config, parallel_dims
from normtron.trainer.convert.hf.mapping import LLAMA, architecture, hf_config, hf_names
from normtron.trainer.engine import build_engine, build_mesh, compute_context, init_model, parallelize_model
from normtron.trainer.loss import cross_entropy
from normtron.trainer.optim import build_lr_scheduler, build_optimizer

CPU_DEFAULTS = dict(dim=256, layers=4, heads=4, kv_heads=2, ffn=768, vocab=8192, seq=256, batch=4, steps=5)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a normtron config for the model (default: configs/tiny.yaml's sections with "
                                    "the sizes below)")
    p.add_argument("--dim", type=int, help=f"model.dim (CPU default {CPU_DEFAULTS['dim']})")
    p.add_argument("--layers", type=int, help=f"model.n_layers (CPU default {CPU_DEFAULTS['layers']})")
    p.add_argument("--heads", type=int, help=f"model.n_heads (CPU default {CPU_DEFAULTS['heads']})")
    p.add_argument("--kv-heads", type=int, help=f"model.n_kv_heads (CPU default {CPU_DEFAULTS['kv_heads']})")
    p.add_argument("--ffn", type=int, help=f"model.ffn_hidden_dim (CPU default {CPU_DEFAULTS['ffn']})")
    p.add_argument("--vocab", type=int, help=f"model.vocab_size (CPU default {CPU_DEFAULTS['vocab']})")
    p.add_argument("--seq", type=int, help=f"tokens per sequence (CPU default {CPU_DEFAULTS['seq']}; GPU 2048)")
    p.add_argument("--batch", type=int, help=f"sequences per step (CPU default {CPU_DEFAULTS['batch']}; GPU 4)")
    p.add_argument("--steps", type=int, help=f"timed steps (CPU default {CPU_DEFAULTS['steps']}; GPU 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--loss-chunk", type=int, nargs="+", default=[0, 1024],
                   help="training.loss_chunk_size values to run normtron with (0 = full logits; default: 0 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="further config overrides, as for normtron train (KEY=VALUE; before "
                                                "--loss-chunk, or after --)")
    return p.parse_args()


def build_config(args: argparse.Namespace, device: torch.device):
    gpu = device.type == "cuda"
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else (None if gpu and args.config else v)
             for k, v in CPU_DEFAULTS.items()}
    seq, batch = sizes["seq"] or 2048, sizes["batch"] or 4
    keys = {"dim": "model.dim", "layers": "model.n_layers", "heads": "model.n_heads", "kv_heads": "model.n_kv_heads",
            "ffn": "model.ffn_hidden_dim", "vocab": "model.vocab_size"}
    overrides = [f"{key}={sizes[name]}" for name, key in keys.items() if sizes[name] is not None]
    overrides += ["parallel.backend=ddp", f"training.precision={'bf16' if gpu else 'fp32'}", "parallel.compile=false",
                  f"data.seq_len={seq}", f"training.batch_size={batch}", "training.micro_batch_size=null",
                  "training.warmup_steps=0", f"run.seed={args.seed}", *args.overrides]
    cfg = load_config(args.config or str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"), overrides)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq)
    if architecture(cfg.model) != LLAMA:
        sys.exit(f"bench/throughput.py: the model is {architecture(cfg.model)}, not {LLAMA}: use placement=pre, "
                 f"norm=rmsnorm, no qk_norm / embed_norm / µP")
    return cfg, seq, batch, sizes["steps"] or 20


def normtron_engine(cfg, chunk: int, dist_info):
    """`normtron train`'s engine in one process, with training.loss_chunk_size = `chunk`."""
    cfg = copy.deepcopy(cfg)
    cfg.training.loss_chunk_size = chunk
    with torch.device("meta"):
        model = Transformer(cfg.model)
    dims = parallel_dims(cfg, 1)
    mesh = build_mesh(cfg, dims, dist_info.device)
    parallel = parallelize_model(cfg, model, dims, mesh)
    init_model(parallel, cfg, dist_info.device, None)
    return build_engine(cfg, parallel, dims, mesh, dist_info)


def hf_model_with_weights_of(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """LlamaForCausalLM from the config `normtron convert to-hf` writes, holding `model`'s weights."""
    import transformers

    config = transformers.LlamaConfig.from_dict(hf_config(cfg.model, torch.float32))
    config._attn_implementation = "sdpa"  # normtron's attention is SDPA too
    hf = transformers.LlamaForCausalLM(config).to(device)
    ours = model.state_dict()
    hf.load_state_dict({hf_name: ours[name] for hf_name, name in hf_names(cfg.model).items()}, strict=False)
    if cfg.model.tie_embeddings:
        hf.tie_weights()
    return hf.train()


class HFSteps:
    """The HF model's training step, as the engine's: loss, backward, clip, AdamW (same groups), schedule."""

    def __init__(self, hf: torch.nn.Module, cfg, device: torch.device):
        self.model, self.max_norm = hf, cfg.training.grad_clip
        self.optimizer = build_optimizer(hf, cfg.training)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.training)
        self.autocast = compute_context(cfg, device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.autocast:
            logits = self.model(input_ids=x, use_cache=False).logits
        cross_entropy(logits, y).backward()
        if self.max_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def normtron_step(engine, x: torch.Tensor, y: torch.Tensor, max_norm: float) -> None:
    engine.forward_backward(x, y)
    engine.step(max_norm)


def check_same_logits(engine, hf, x: torch.Tensor) -> float:
    """The largest logit difference relative to the largest logit (fp32, no autocast); exits if above 1e-4."""
    with torch.no_grad():
        ours, theirs = engine.model(x).float(), hf(input_ids=x, use_cache=False).logits.float()
    rel = ((ours - theirs).abs().max() / ours.abs().max()).item()
    if not rel <= 1e-4:
        sys.exit(f"bench/throughput.py: normtron's and HF's logits differ (max relative {rel:.2e}): not the same model")
    return rel


def median_step_seconds(steps: dict, n: int, warmup: int, device: torch.device) -> dict[str, float]:
    """The median time of each of `steps` (name -> step function), timed in turns (one step of each, n rounds), so
    that both see the same load on a shared machine."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return {name: statistics.median(t) for name, t in times.items()}


def plan_prediction(cfg, device: torch.device, measured_s: float) -> str:
    """The step time `normtron plan` predicts for this run on this GPU against the measured one, or why not."""
    if device.type != "cuda":
        return "no GPU: no plan column"
    from normtron.trainer.plan import device_in_use, make_plan

    gpu = device_in_use()
    predicted = make_plan(cfg, 1, gpu).time.step_s
    return (f"normtron plan predicts {predicted:.4f} s/step on {gpu.name} for normtron's step "
            f"(loss_chunk_size={cfg.training.loss_chunk_size}); measured {measured_s:.4f} s "
            f"(measured / predicted {measured_s / predicted:.2f})")


def main() -> None:
    args = parse_args()
    dist_info = init_distributed()
    device = dist_info.device
    cfg, seq, batch, n_steps = build_config(args, device)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    m = cfg.model
    print(f"model dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads ({m.kv_heads} kv), ffn {m.hidden_dim}, "
          f"vocab {m.vocab_size}; {batch} x {seq} tokens per step; {cfg.training.precision} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} "
          f"({torch.get_num_threads()} threads), eager; median of {n_steps} steps after {args.warmup}", flush=True)

    # Every variant is built first and then all are timed in turns, so that they share the same machine load.
    steps, hf = {}, None
    for chunk in args.loss_chunk:
        engine = normtron_engine(cfg, chunk, dist_info)
        steps[f"normtron, loss_chunk_size={chunk}"] = functools.partial(normtron_step, engine, x, y,
                                                                         cfg.training.grad_clip)
        if hf is None:  # the same weights in every engine (one seed): one HF model
            hf = hf_model_with_weights_of(engine.model, cfg, device)
        print(f"loss_chunk_size={chunk}: normtron's and HF's logits agree to {check_same_logits(engine, hf, x):.1e} "
              f"(max difference relative to max logit)", flush=True)
    hf_steps = HFSteps(hf, cfg, device)
    steps["HF LlamaForCausalLM"] = functools.partial(hf_steps.step, x, y)
    medians = median_step_seconds(steps, n_steps, args.warmup, device)

    hf_seconds = medians["HF LlamaForCausalLM"]
    print("\n| step | s/step (median) | tokens/s | HF time / this |")
    print("|---|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.4f} | {batch * seq / seconds:,.0f} | {hf_seconds / seconds:.2f}x |")
    cfg.training.loss_chunk_size = args.loss_chunk[0]  # the plan for the first normtron variant
    print(f"\n{plan_prediction(cfg, device, medians[next(iter(medians))])}")


if __name__ == "__main__":
    main()
