"""Training throughput of one device in bf16 and in FP8 (each torchao recipe), side by side: tokens/s, MFU and the
speed-up over bf16.

    python bench/precision.py                         # GPU: configs/1b.yaml's model (1.1B), 4 x 2048 tokens per step
    python bench/precision.py --config configs/3b.yaml --batch 2 --precisions bf16 fp8-tensorwise
    python bench/precision.py --no-compile            # eager (FP8's casts then cost more than they save)
    python bench/precision.py                         # CPU: a tiny model; checks the script, predicts nothing

Each precision builds the model exactly as `normtron train` does (`parallelize_model`: FP8 conversion on meta, then
FSDP2 on one rank with bf16 compute and fp32 master weights, or DDP's autocast with --backend ddp), compiles each
transformer block (as torchtitan measures FP8; --no-compile to skip), and times optimizer steps on random tokens
after warm-up steps. MFU counts the model's training FLOPs (models.flops_per_token) against the device's bf16 dense
peak, so FP8 can exceed what bf16 could reach. torchtitan reports +28% tokens/s for FP8 (tensorwise) over bf16 on
Llama-3.1-8B on H100s; FP8 pays off when the matmuls dominate, i.e. for large dims.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import timed
from normtron.models.transformer import Transformer, flops_per_token
from normtron.parallel.distributed import init_distributed, shutdown_distributed
from normtron.parallel.float8 import FP8_RECIPES, float8_problem
from normtron.trainer.config import load_config, parallel_dims
from normtron.trainer.engine import build_engine, build_mesh, compute_context, init_model, parallelize_model
from normtron.trainer.loss import cross_entropy
from normtron.trainer.metrics import device_peak_flops

PRECISIONS = ["bf16", *(f"fp8-{recipe}" for recipe in FP8_RECIPES)]
CPU_MODEL = ["model.dim=256", "model.n_layers=2", "model.n_heads=4", "model.ffn_hidden_dim=1024",
             "model.vocab_size=4096", "model.max_seq_len=128"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/1b.yaml", help="model config on a GPU (default configs/1b.yaml)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4; 2 on CPU)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048; 128 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20; 5 on CPU)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=PRECISIONS)
    p.add_argument("--backend", choices=["fsdp", "ddp"], default="fsdp",
                   help="fsdp: bf16 parameters for compute (as torchtitan on one GPU); ddp: fp32 weights + autocast")
    p.add_argument("--no-compile", action="store_true", help="run eagerly instead of compiling each block")
    p.add_argument("--emulate", action="store_true", help="training.fp8_emulate (GPUs without FP8 matmuls)")
    return p.parse_args()


def measure(args, precision: str, device: torch.device) -> dict:
    """tokens/s and MFU of `args.steps` optimizer steps in `precision`."""
    on_cpu = device.type == "cpu"
    recipe = precision.partition("-")[2]
    overrides = [f"parallel.backend={args.backend}", f"training.precision={precision.partition('-')[0]}",
                 f"training.fp8_recipe={recipe or 'tensorwise'}", f"training.fp8_emulate={args.emulate}",
                 "training.warmup_steps=0", f"data.seq_len={args.seq}", f"parallel.compile={not args.no_compile}",
                 *(CPU_MODEL if on_cpu else [])]
    cfg = load_config(None if on_cpu else args.config, overrides)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, args.seq)
    dist_info = init_distributed(needs_process_group=args.backend == "fsdp")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    dims = parallel_dims(cfg, dist_info.world_size)
    mesh = build_mesh(cfg, dims, dist_info.device)
    parallel = parallelize_model(cfg, model, dims, mesh)
    init_model(parallel, cfg, dist_info.device, None)
    engine = build_engine(cfg, parallel, dims, mesh, dist_info)
    autocast = compute_context(cfg, device)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with autocast:
            logits = engine.model(x)
        engine.backward(cross_entropy(logits, y), last=True)
        engine.step(1.0)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        times.append(timed(step, device))
    tokens_per_s = args.batch * args.seq / statistics.median(times)
    peak = device_peak_flops(device, None)
    result = {"precision": precision, "tokens_per_s": tokens_per_s,
              "mfu": tokens_per_s * flops_per_token(cfg.model, args.seq) / peak if peak else None,
              "params": sum(p.numel() for p in engine.model.parameters()),
              "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return result


def main() -> None:
    args = parse_args()
    device = init_distributed().device
    if device.type == "cpu":
        args.batch, args.seq, args.steps = min(args.batch, 2), min(args.seq, 128), min(args.steps, 5)
        args.warmup, args.no_compile = min(args.warmup, 2), True  # compiling would dominate a CPU run
    fp8 = [p for p in args.precisions if p.startswith("fp8")]
    if fp8 and (problem := float8_problem(device, args.emulate)):
        sys.exit(f"{problem}: pass --emulate to run FP8 emulated (numerics only), or --precisions bf16")
    rows = []
    for precision in args.precisions:
        print(f"{precision}: {args.warmup} warm-up + {args.steps} timed steps of {args.batch} x {args.seq} tokens ...",
              flush=True)
        rows.append(measure(args, precision, device))
        gc.collect()  # the previous model's memory back before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    shutdown_distributed()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, {rows[0]['params'] / 1e6:,.0f}M parameters, {args.batch} x {args.seq} tokens/step, "
          f"backend {args.backend}, {'eager' if args.no_compile else 'compiled blocks'}")
    base = next((r["tokens_per_s"] for r in rows if r["precision"] == "bf16"), None)
    print(f"{'precision':<24}{'tokens/s':>12}{'MFU':>8}{'vs bf16':>9}{'peak GiB':>10}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        speedup = f"{r['tokens_per_s'] / base - 1:+.1%}" if base else "-"
        memory = f"{r['memory_gib']:.1f}" if r["memory_gib"] is not None else "-"
        print(f"{r['precision']:<24}{r['tokens_per_s']:>12,.0f}{mfu:>8}{speedup:>9}{memory:>10}")
    if device.type == "cpu":
        print("\nCPU timings do not predict GPU speed-ups: a CPU has no FP8 matrix units, so torch._scaled_mm there "
              "is just another (differently optimized) matmul. Run this on an H100 (target: fp8 >= +25% tokens/s "
              "over bf16).")


if __name__ == "__main__":
    main()
