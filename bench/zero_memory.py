"""Per-rank memory of model states (parameters + gradients + optimizer state) under DDP, DeepSpeed ZeRO-1/2/3 and
FSDP2, next to the ZeRO paper's analytic values for mixed-precision Adam (Rajbhandari et al. 2020, Fig. 1):

    DDP 16Ψ    ZeRO-1 4Ψ + 12Ψ/N    ZeRO-2 2Ψ + 14Ψ/N    ZeRO-3 16Ψ/N    (bytes, Ψ parameters, N ranks)

FSDP2 with bf16 compute keeps fp32 sharded parameters, gradients and Adam moments: 16Ψ/N like ZeRO-3.

    python bench/zero_memory.py                     # every backend at N = 1, 2, 4 (CPU/gloo or GPUs/NCCL)
    python bench/zero_memory.py --world-sizes 2 --backends zero3 fsdp

Each configuration runs under torchrun. A worker builds a ~50M-parameter model and trains two bf16 steps (one
64-token sequence per rank). Right after the second backward, when parameters, gradients and optimizer state all
exist, and again after the optimizer step, it adds up every distinct tensor storage reachable from Python (see
live_tensor_bytes); the larger value is the measured model-state memory of that rank. The table also shows the
growth of the process's resident set (VmHWM) over the two steps, which adds what Python cannot see (DDP's
gradient buckets, allocator slack, activations). It prints a table (also written as CSV and Markdown) and plots
measured against analytic bytes per parameter when matplotlib is present.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# DeepSpeed preallocates constant-size communication buffers of `reduce_bucket_size` elements (ZeRO-3: 5e8 by
# default, 954 MiB in bf16, whatever the model size); the paper's formulas count model states only, so the
# buckets are set to 2M elements (4 MiB) here — the `deepspeed:` passthrough a user would use on a small model.
DS_BUCKETS = "deepspeed.zero_optimization.reduce_bucket_size=2000000"
BACKENDS = {  # name -> config overrides
    "ddp": ["parallel.backend=ddp"],
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1", DS_BUCKETS],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2", DS_BUCKETS],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3", DS_BUCKETS],
    "fsdp": ["parallel.backend=fsdp"],
}
# ~50M parameters: 12 layers of dim 512 plus an 8192-token vocabulary (untied embedding and head).
MODEL = ["model.dim=512", "model.n_layers=12", "model.n_heads=8", "model.ffn_hidden_dim=1408", "model.vocab_size=8192",
         "model.max_seq_len=128", "data.seq_len=64", "training.precision=bf16", "training.warmup_steps=0"]


def analytic_bytes_per_param(backend: str, n: int) -> float:
    return {"ddp": 16, "zero1": 4 + 12 / n, "zero2": 2 + 14 / n, "zero3": 16 / n, "fsdp": 16 / n}[backend]


def live_tensor_bytes(model) -> int:
    """Bytes of every distinct tensor storage reachable from Python: parameters (a DTensor counts its local shard),
    their gradients, optimizer state and the backend's own buffers (DeepSpeed keeps its flat partitions in Python
    attributes). Tensors only C++ holds (DDP's reducer buckets, autograd's saved activations) are not seen."""
    import torch
    for param in model.parameters():
        _ = param.grad  # give C++-held gradients a Python object, so the census below sees them
    gc.collect()
    sizes: dict[int, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        tensor = getattr(obj, "_local_tensor", obj)  # a DTensor's storage is its local shard
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr():
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(sizes.values())


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (everything: libraries, buffers, allocator slack)."""
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(backend: str, out: Path) -> None:
    import torch
    import torch.nn.functional as F

    from normtron.models.transformer import count_parameters
    from normtron.parallel.distributed import all_reduce_sum, barrier, init_distributed
    from normtron.trainer.config import load_config, parallel_dims
    from normtron.trainer.engine import build_engine, build_mesh, compute_context, init_model, parallelize_model
    from normtron.trainer.train import build_model_on_meta

    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(None, [*MODEL, *BACKENDS[backend], f"training.batch_size={world}"])
    dist_info = init_distributed(needs_process_group=True)
    model = build_model_on_meta(cfg)
    n_params = count_parameters(model)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), device=dist_info.device)
    baseline = live_tensor_bytes(model)  # meta model: nothing allocated yet
    gc.collect()
    rss_base = peak_rss_bytes()
    dims = parallel_dims(cfg, dist_info.world_size)
    mesh = build_mesh(cfg, dims, dist_info.device)
    parallel = parallelize_model(cfg, model, dims, mesh)
    init_model(parallel, cfg, dist_info.device, None)
    engine = build_engine(cfg, parallel, dims, mesh, dist_info)
    gc.collect()
    reset_peak_rss()  # the peak of training, not of materializing before sharding
    states = 0
    for step in range(2):  # the first step creates the optimizer state; the second runs with everything allocated
        with engine.micro_batch(True), compute_context(cfg, dist_info.device):
            logits = engine.model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            engine.backward(loss, True)
        del logits, loss
        if step == 1:  # after backward: parameters, gradients and optimizer state all exist
            states = live_tensor_bytes(engine.model) - baseline
        engine.step(1.0)
    states = max(states, live_tensor_bytes(engine.model) - baseline)
    rss = peak_rss_bytes() - rss_base
    slots = [0.0] * (2 * world)
    slots[dist_info.rank], slots[world + dist_info.rank] = float(states), float(rss)
    totals = all_reduce_sum(slots, dist_info.device)
    if dist_info.is_main:
        out.write_text(json.dumps({"backend": backend, "world_size": world, "params": n_params,
                                   "bytes_per_rank": totals[:world], "rss_per_rank": totals[world:]}))
    barrier()
    os._exit(0)  # tearing down DeepSpeed/DDP process-group state can hang on gloo; the measurement is done


def run_all(backends: list[str], world_sizes: list[int], out_dir: Path) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO),
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    for backend in backends:
        for n in world_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                result_file = Path(tmp) / "result.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                       __file__, "--worker", backend, "--result", str(result_file)]
                print(f"measuring {backend} at N={n} ...", flush=True)
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{backend} at N={n} failed")
                result = json.loads(result_file.read_text())
            psi = result["params"]
            measured = max(result["bytes_per_rank"]) / psi
            analytic = analytic_bytes_per_param(backend, n)
            rows.append({"backend": backend, "N": n, "params_M": round(psi / 1e6, 2),
                         "measured_bytes_per_param": round(measured, 2), "analytic_bytes_per_param": round(analytic, 2),
                         "measured_MiB_per_rank": round(max(result["bytes_per_rank"]) / 2**20, 1),
                         "analytic_MiB_per_rank": round(analytic * psi / 2**20, 1),
                         "deviation_pct": round(100 * (measured - analytic) / analytic, 1),
                         "peak_rss_MiB_per_rank": round(max(result["rss_per_rank"]) / 2**20, 1)})
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "zero_memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def print_table(rows: list[dict], out_dir: Path) -> None:
    header = ["backend", "N", "measured B/Ψ", "ZeRO paper B/Ψ", "measured MiB/rank", "analytic MiB/rank", "deviation",
              "peak RSS growth MiB/rank"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['N']} | {r['measured_bytes_per_param']:.2f} | "
                     f"{r['analytic_bytes_per_param']:.2f} | {r['measured_MiB_per_rank']:.1f} | "
                     f"{r['analytic_MiB_per_rank']:.1f} | {r['deviation_pct']:+.1f}% | "
                     f"{r['peak_rss_MiB_per_rank']:.0f} |")
    table = "\n".join(lines)
    print(f"\nmodel states per rank, {rows[0]['params_M']}M parameters, bf16 compute + fp32 Adam\n\n{table}")
    (out_dir / "zero_memory.md").write_text(table + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, backend in enumerate(dict.fromkeys(r["backend"] for r in rows)):
        mine = [r for r in rows if r["backend"] == backend]
        color = f"C{i}"
        ax.plot([r["N"] for r in mine], [r["measured_bytes_per_param"] for r in mine], "o-", color=color,
                label=f"{backend} measured")
        ax.plot([r["N"] for r in mine], [r["analytic_bytes_per_param"] for r in mine], "x--", color=color,
                alpha=0.6, label=f"{backend} ZeRO paper")
    ax.set_xlabel("ranks N")
    ax.set_ylabel("bytes per parameter per rank")
    ax.set_xticks(sorted({r["N"] for r in rows}))
    ax.set_title("Model-state memory per rank (mixed-precision Adam)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "zero_memory.png", dpi=120)
    print(f"plot: {out_dir / 'zero_memory.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the CSV/MD/PNG go")
    parser.add_argument("--worker", choices=list(BACKENDS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.result)
        return
    rows = run_all(args.backends, args.world_sizes, args.out)
    print_table(rows, args.out)


if __name__ == "__main__":
    main()
