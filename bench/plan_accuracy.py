"""Predicted (trainer/plan) against measured peak memory per rank, for a grid of small configs on CPU (gloo).

    python bench/plan_accuracy.py                    # the whole grid (about 5 minutes on 2 CPU cores)
    python bench/plan_accuracy.py --rows fp32-none-512 fp32-full-512

Each row runs under torchrun (1 or 2 ranks). A worker builds the run as `normtron train` does (parallelize_model,
build_engine), trains two steps on random tokens and measures the second, in steady state:

    measured peak = VmHWM during step 2 - VmRSS before the model was materialized

i.e. the growth of the process's resident set from just before the model existed (the backends' libraries, e.g.
DeepSpeed with what its `initialize` imports on first use, and torch.distributed.pipelining with Triton, already
imported) to the high-water mark of the step: parameters, gradients, optimizer state, every framework buffer
(also those only C++ holds, such as DDP's buckets), activations and the logits, plus what the allocator and
libraries add (that is error the planner does not model, on purpose: it is what a user would see). glibc is told to serve allocations above 128 KiB with mmap
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set instead of staying in malloc's heap. Prints a
Markdown table and writes it (with a CSV) to --out.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.ffn_hidden_dim=704",
         "model.vocab_size=8192", "model.max_seq_len=512", "model.kernels=torch", "training.warmup_steps=0",
         "training.grad_clip=1.0"]
DS = ["parallel.backend=deepspeed", "training.precision=bf16",
      "deepspeed.zero_optimization.reduce_bucket_size=2000000"]
# name -> (ranks, overrides); 4 sequences per data-parallel rank
ROWS = {
    "fp32-none-256": (1, ["data.seq_len=256"]),
    "fp32-none-512": (1, ["data.seq_len=512"]),
    "fp32-selective-512": (1, ["data.seq_len=512", "parallel.activation_checkpoint=selective"]),
    "fp32-full-512": (1, ["data.seq_len=512", "parallel.activation_checkpoint=full"]),
    "fp32-none-512-chunked": (1, ["data.seq_len=512", "training.loss_chunk_size=256"]),
    "bf16-none-512": (1, ["data.seq_len=512", "training.precision=bf16"]),
    "ddp2-none-256": (2, ["data.seq_len=256", "parallel.backend=ddp"]),
    "fsdp2-none-256": (2, ["data.seq_len=256", "parallel.backend=fsdp"]),
    "fsdp2-bf16-full-512-chunked": (2, ["data.seq_len=512", "parallel.backend=fsdp", "training.precision=bf16",
                                       "parallel.activation_checkpoint=full", "training.loss_chunk_size=256"]),
    "zero1-2-256": (2, ["data.seq_len=256", *DS, "parallel.zero_stage=1"]),
    "zero2-2-256": (2, ["data.seq_len=256", *DS, "parallel.zero_stage=2"]),
    "zero3-2-256": (2, ["data.seq_len=256", *DS, "parallel.zero_stage=3"]),
    "tp2-256": (2, ["data.seq_len=256", "parallel.backend=fsdp", "parallel.tp=2", "parallel.dp_shard=1"]),
    "pp2-1F1B-256": (2, ["data.seq_len=256", "parallel.backend=fsdp", "parallel.pp=2", "parallel.dp_shard=1",
                         "training.micro_batch_size=1"]),
    "pp2-GPipe-256": (2, ["data.seq_len=256", "parallel.backend=fsdp", "parallel.pp=2", "parallel.dp_shard=1",
                          "parallel.pp_schedule=GPipe", "training.micro_batch_size=1"]),
}


def overrides(name: str, world: int) -> list[str]:
    ranks, extra = ROWS[name]
    tp_pp = 2 if any(o in extra for o in ("parallel.tp=2", "parallel.pp=2")) else 1
    return [*MODEL, *extra, f"training.batch_size={4 * world // tp_pp}"]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith(field)))


def _load_deepspeed_libraries(cfg, world: int, backend: str | None) -> None:
    """`deepspeed.initialize` imports ~700 modules on first use (torch._dynamo's stack with sympy, networkx,
    jinja2 and Triton; setuptools/distutils for its op builder): ~50 MiB of resident set per rank, the same for any
    model size (measured for dim 256 and 512), so library code rather than a buffer. A throwaway engine over one
    Linear, with the run's DeepSpeed config, loads them before the baseline. DeepSpeed keeps that engine alive
    (ZeRO-3 with its reduce bucket), so its bucket is made tiny: the baseline holds no buffer of the measured run."""
    import torch

    from normtron.parallel.zero import DeepSpeedEngine
    from normtron.trainer.config import deepspeed_config
    config = deepspeed_config(cfg, world)
    config["zero_optimization"]["reduce_bucket_size"] = 64
    tiny = torch.nn.Linear(8, 8)
    DeepSpeedEngine(tiny, torch.optim.AdamW(tiny.parameters()), None, config, backend)
    gc.collect()


def worker(name: str, out: Path) -> None:
    import torch

    from normtron.parallel.distributed import all_reduce_sum, barrier, init_distributed
    from normtron.trainer.config import load_config, parallel_dims
    from normtron.trainer.engine import build_engine, build_mesh, init_model, parallelize_model
    from normtron.trainer.plan.memory import plan_memory
    from normtron.trainer.train import build_model_on_meta

    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(None, overrides(name, world))
    dist_info = init_distributed(needs_process_group=True)
    dims = parallel_dims(cfg, world)
    model = build_model_on_meta(cfg)
    mesh = build_mesh(cfg, dims, dist_info.device)
    # Libraries the backends load on first use count towards the process but are no tensor the planner models:
    # loaded before the baseline.
    import torch.distributed.pipelining  # noqa: F401  (imports Triton)
    import torch.distributed.tensor.parallel  # noqa: F401
    if cfg.parallel.backend == "deepspeed":
        _load_deepspeed_libraries(cfg, world, dist_info.backend)
    gc.collect()
    base = _status("VmRSS:")
    parallel = parallelize_model(cfg, model, dims, mesh)
    init_model(parallel, cfg, dist_info.device, None)
    engine = build_engine(cfg, parallel, dims, mesh, dist_info)
    local = cfg.training.batch_size // dims.dp_size
    gen = torch.Generator().manual_seed(dims.dp_coordinates(dist_info.rank)[0])
    tokens = torch.randint(0, cfg.model.vocab_size, (local, cfg.data.seq_len + 1), generator=gen)
    for step in range(2):
        if step == 1:
            gc.collect()
            barrier()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS: the high-water mark of step 2 alone
            start = time.time()
        engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
        engine.step(1.0)
    seconds = time.time() - start
    measured = _status("VmHWM:") - base
    pp_rank = dist_info.rank // (world // dims.pp)
    predicted = plan_memory(cfg, dims)[pp_rank]
    slots = [0.0] * (2 * world)
    slots[dist_info.rank], slots[world + dist_info.rank] = float(measured), float(predicted.total)
    totals = all_reduce_sum(slots, dist_info.device)
    if dist_info.is_main:
        out.write_text(json.dumps({"row": name, "measured": totals[:world], "predicted": totals[world:],
                                   "terms": {t.name: t.bytes for t in predicted.terms}, "seconds": seconds}))
    barrier()
    os._exit(0)  # DeepSpeed/gloo teardown can hang; the measurement is done


def run(names: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}
    results = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ROWS[name][0]}",
                   __file__, "--worker", name, "--result", str(result)]
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
            if done.returncode != 0 or not result.exists():
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            results.append(json.loads(result.read_text()))
    return results


def table(results: list[dict]) -> str:
    lines = ["| config | ranks | rank | predicted MiB | measured MiB | deviation |", "|---|---|---|---|---|---|"]
    for r in results:
        for rank, (pred, meas) in enumerate(zip(r["predicted"], r["measured"])):
            lines.append(f"| {r['row']} | {len(r['measured'])} | {rank} | {pred / 2**20:.1f} | {meas / 2**20:.1f} | "
                         f"{(pred / meas - 1) * 100:+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--out", default=None, metavar="DIR", help="also write plan_accuracy.{md,csv,json} here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.result))
    results = run(args.rows)
    text = table(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan_accuracy.md").write_text(text + "\n")
        (out / "plan_accuracy.json").write_text(json.dumps(results, indent=1))
        with open(out / "plan_accuracy.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["config", "rank", "predicted_bytes", "measured_bytes"])
            for r in results:
                for rank, (pred, meas) in enumerate(zip(r["predicted"], r["measured"])):
                    writer.writerow([r["row"], rank, int(pred), int(meas)])


if __name__ == "__main__":
    main()
