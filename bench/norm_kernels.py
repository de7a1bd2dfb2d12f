"""Benchmark the fused Triton norm kernels on a GPU against PyTorch eager, torch.compile and Liger-Kernel.

    python bench/norm_kernels.py                       # 16384 rows x hidden 1024..16384, bf16, RMSNorm, LayerNorm, DyT
    python bench/norm_kernels.py --hidden 4096 --norm rmsnorm --rows 32768
    TRITON_INTERPRET=1 python bench/norm_kernels.py --smoke   # tiny shapes on CPU: checks the script, measures nothing
    python bench/norm_kernels.py --ptxas               # no GPU needed: compile every kernel for an H100, print registers

For each norm and hidden size it times, as medians (triton.testing.do_bench), the forward and the forward+backward of
`norm(x)` and of the fused `add_norm(x, residual)` (y = Norm(x + residual) and the new residual), and prints the
achieved bandwidth in GB/s -- the bytes each op must move at least, divided by its time -- next to the bandwidth of a
plain device-to-device copy measured on the same GPU. "eager" is what `model.kernels=torch` runs (PyTorch ops with
fp32 statistics); "compile" is the same under torch.compile; "liger" is Liger-Kernel when it is installed
(LigerDyT for DyT, which has no fused residual add there).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NORMS = ("rmsnorm", "layernorm", "dyt")
DYT_ALPHA = 0.5  # DyT's scalar alpha in the benchmark (the paper's default alpha0 outside LLMs)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16384, help="rows (tokens) per call (default 16384)")
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="hidden sizes")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--norm", choices=NORMS, nargs="+", default=list(NORMS))
    p.add_argument("--impls", nargs="+", default=["triton", "eager", "compile", "liger"],
                   choices=["triton", "eager", "compile", "liger"], help="implementations to time")
    p.add_argument("--ptxas", action="store_true",
                   help="compile every kernel variant for sm_90a (H100) with Triton's bundled ptxas and print its "
                        "register and spill report; needs no GPU")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on whatever device there is (on CPU: Triton's interpreter, wall-clock timer); "
                        "checks that the script runs, its numbers mean nothing")
    return p.parse_args()


# --- Implementations: each returns fn(x, residual or None) -> tuple of outputs -------------------------------------
# `alpha` is DyT's scalar parameter (None for the other norms).

def triton_impl(norm_type: str, weight, bias, eps: float, alpha=None):
    if norm_type == "dyt":
        from normtron.kernels.triton_dyt import add_dyt, dyt
        return lambda x, residual: ((dyt(x, alpha, weight, bias),) if residual is None
                                    else add_dyt(x, residual, alpha, weight, bias))
    from normtron.kernels.triton_norm import add_norm, norm

    rms = norm_type == "rmsnorm"

    def fn(x, residual):
        if residual is None:
            return (norm(x, weight, bias, eps, rms=rms),)
        return add_norm(x, residual, weight, bias, eps, rms=rms)
    return fn


def eager_impl(norm_type: str, weight, bias, eps: float, alpha=None):
    from normtron.models.norms import build_norm

    module = build_norm(norm_type, weight.shape[0], eps, bias is not None, kernels="torch")
    module.weight, module.bias = weight, bias  # the shared parameters
    if alpha is not None:
        module.alpha = alpha

    def fn(x, residual):
        return (module(x),) if residual is None else module.add_forward(x, residual)
    return fn


def compile_impl(norm_type: str, weight, bias, eps: float, alpha=None):
    torch._dynamo.reset()  # every shape compiles afresh, never hitting the recompile limit (then running eagerly)
    return torch.compile(eager_impl(norm_type, weight, bias, eps, alpha))


def liger_impl(norm_type: str, weight, bias, eps: float, alpha=None):
    """Liger-Kernel's modules with our parameters; its fused add exists for RMSNorm only."""
    if norm_type == "dyt":
        from liger_kernel.transformers import LigerDyT  # (its module moved between releases)
        dyt_module = LigerDyT(weight.shape[0])
        dyt_module.alpha, dyt_module.gamma, dyt_module.beta = alpha, weight, bias

        def dyt_fn(x, residual):
            if residual is not None:
                raise NotImplementedError("no fused add+DyT in Liger-Kernel")
            return (dyt_module(x),)
        return dyt_fn
    if norm_type == "rmsnorm":
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        norm_module = LigerRMSNorm(weight.shape[0], eps=eps)
    else:
        from liger_kernel.transformers.layer_norm import LigerLayerNorm
        norm_module = LigerLayerNorm(weight.shape[0], eps=eps)
        norm_module.bias = bias
    norm_module.weight = weight
    add_module = None
    if norm_type == "rmsnorm":
        try:
            from liger_kernel.transformers.fused_add_rms_norm import (
                LigerFusedAddRMSNorm,
            )
            add_module = LigerFusedAddRMSNorm(weight.shape[0], eps=eps)
            add_module.weight = weight
        except ImportError:  # older Liger-Kernel
            pass

    def fn(x, residual):
        if residual is None:
            return (norm_module(x),)
        if add_module is None:
            raise NotImplementedError("no fused add+norm in Liger-Kernel for this norm")
        return tuple(add_module(x, residual))
    return fn


IMPLS = {"triton": triton_impl, "eager": eager_impl, "compile": compile_impl, "liger": liger_impl}


# --- Timing --------------------------------------------------------------------------------------------------------

def timer(device: torch.device):
    """fn -> median milliseconds: triton.testing.do_bench (CUDA events, cache flushed) on a GPU; wall clock else."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return wall


def copy_bandwidth(device: torch.device, time_ms, numel: int) -> float:
    """GB/s of dst.copy_(src): the bandwidth a memory-bound kernel can hope for (read + write)."""
    src = torch.empty(numel, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * numel / time_ms(lambda: dst.copy_(src)) / 1e6


def min_bytes(rows: int, hidden: int, itemsize: int, fused: bool, backward: bool) -> int:
    """Bytes an ideal kernel moves: forward reads x (+ residual) and writes y (+ the new residual); backward reads the
    saved input and dy (+ the new residual's gradient) and writes dx. Weights and statistics are negligible."""
    tensor = rows * hidden * itemsize
    forward = (4 if fused else 2) * tensor
    return forward + ((4 if fused else 3) * tensor if backward else 0)


def measure(fn, leaves, x, residual, outputs_grad, time_ms) -> tuple[float, float]:
    """(forward ms, forward+backward ms); the backward computes the gradients of all `leaves` (inputs and weights)."""

    def forward():
        with torch.no_grad():
            fn(x, residual)

    def forward_backward():
        outs = fn(x, residual)
        torch.autograd.grad(outs, leaves, outputs_grad[:len(outs)])
    return time_ms(forward), time_ms(forward_backward)


# --- Compile report --------------------------------------------------------------------------------------------

def ptxas_report(hidden_sizes: list[int], arch: int = 90) -> list[str]:
    """Each kernel as the launcher would run it for each hidden size (bf16 tensors, fp32 statistics), compiled by
    Triton for `arch` and assembled with its ptxas -v: one line of registers and spill bytes per variant."""
    import subprocess
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from normtron.kernels import triton_norm as K

    target = GPUTarget("cuda", arch, 32)
    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # Triton < 3.9 has one ptxas for every architecture
        ptxas = get_ptxas().path
    from normtron.kernels import triton_dyt as D

    stats = {"MEAN", "RSTD", "DW_PART", "DB_PART", "DA_PART"}
    lines = []
    for n in hidden_sizes:
        for norm_type in ("rmsnorm", "layernorm", "dyt"):
            rms = norm_type == "rmsnorm"
            if norm_type == "dyt":
                variants = [(*D.forward_layout(n), D._dyt_fwd), (*D.backward_layout(n), D._dyt_bwd)]
            else:
                variants = [(*layout(n), kernels[0] if layout(n)[1] else kernels[1]) for layout, kernels in (
                    (K.forward_layout, (K._norm_fwd_rows, K._norm_fwd_chunked)),
                    (K.backward_layout, (K._norm_bwd_rows, K._norm_bwd_chunked)))]
            for block, rows, warps, fn in variants:
                flags = {"IS_RMS": rms, "HAS_RES": True, "STORE_H": True, "HAS_BIAS": not rms, "HAS_DH": True,
                         "STORE_DR": False, "ROWS": rows, "BLOCK": block, "ACC": tl.float32}
                constexprs = {k: v for k, v in flags.items() if k in fn.arg_names}
                # Upper-case arguments are pointers (but the sizes M, N), eps a float, the rest int32 strides.
                signature = {a: "constexpr" if a in constexprs else ("*fp32" if a in stats else "*bf16")
                             if a.isupper() and a not in ("M", "N") else "fp32" if a == "eps" else "i32"
                             for a in fn.arg_names}
                compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target,
                                          options={"num_warps": warps})
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                    ptx.write(compiled.asm["ptx"])
                    ptx.flush()
                    out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", ptx.name, "-o", os.devnull],
                                         capture_output=True, text=True, check=True).stderr
                registers = re.search(r"Used (\d+) registers", out).group(1)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups()
                usage = f"{registers} registers, {spills[0]} bytes spill stores, {spills[1]} bytes spill loads"
                lines.append(f"{norm_type:<10}hidden {n:>6}  {fn.__name__:<18}"
                             f"block {block:>5} x {max(rows, 1):>3} rows, {warps:>2} warps | {usage}")
    return lines


def main() -> int:
    args = parse_args()
    if args.ptxas:
        print("\n".join(ptxas_report([64, 128, 1000, *args.hidden])))
        return 0
    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke on CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
            return 2
        args.rows, args.hidden, copy_numel = 8, [64, 160], 1 << 20
        if device.type == "cpu":
            args.impls = [i for i in args.impls if i != "compile"]  # inductor on CPU takes minutes to build
    elif not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure (bench/norm_kernels.py times the kernels on a GPU; "
              "`TRITON_INTERPRET=1 python bench/norm_kernels.py --smoke` checks the script on CPU)")
        return 0
    else:
        device, copy_numel = torch.device("cuda"), 1 << 30
    dtype = DTYPES[args.dtype]
    time_ms = timer(device)
    copy_gbs = copy_bandwidth(device, time_ms, copy_numel)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    print(f"{name} | torch {torch.__version__} | {args.rows} rows | {args.dtype} | device-to-device copy "
          f"{copy_gbs:,.0f} GB/s")
    print("GB/s = minimum bytes moved / median time; '%' = fraction of the copy bandwidth; "
          "'x eager' = speed-up over eager for forward+backward")
    header = (f"{'norm':<10}{'op':<10}{'hidden':>7}  {'impl':<8}{'fwd ms':>9}{'fwd GB/s':>10}{'%':>5}"
              f"{'f+b ms':>9}{'f+b GB/s':>10}{'%':>5}{'x eager':>9}")
    print(header)
    skipped: dict[str, str] = {}
    results: dict[tuple, tuple] = {}
    for norm_type in args.norm:
        for hidden in args.hidden:
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(args.rows, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
            residual = torch.randn(args.rows, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
            weight = torch.nn.Parameter((1 + 0.1 * torch.randn(hidden, device=device, generator=gen)).to(dtype))
            bias, alpha = None, None
            if norm_type == "dyt":
                alpha = torch.nn.Parameter(torch.full((1,), DYT_ALPHA, device=device, dtype=dtype))
            if norm_type in ("layernorm", "dyt"):
                bias = torch.nn.Parameter((0.1 * torch.randn(hidden, device=device, generator=gen)).to(dtype))
            grads = [torch.randn_like(x), torch.randn_like(x)]
            for op, res in (("norm", None), ("add_norm", residual)):
                leaves = [t for t in (x, res, alpha, weight, bias) if t is not None]
                eager_fb = None
                for impl in sorted(args.impls, key=lambda i: i != "eager"):  # eager first: the speed-up's base
                    if impl in skipped:
                        continue
                    try:
                        fn = IMPLS[impl](norm_type, weight, bias, 1e-5, alpha)
                        fwd, fb = measure(fn, leaves, x, res, grads, time_ms)
                    except ImportError as err:
                        skipped[impl] = f"not installed ({err.name})"
                        continue
                    except Exception as err:  # a failing comparison must not stop the others
                        if impl == "triton":
                            raise
                        print(f"{norm_type:<10}{op:<10}{hidden:>7}  {impl:<8}  n/a: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}")
                        continue
                    eager_fb = fb if impl == "eager" else eager_fb
                    fused = res is not None
                    fwd_gbs = min_bytes(args.rows, hidden, x.element_size(), fused, False) / fwd / 1e6
                    fb_gbs = min_bytes(args.rows, hidden, x.element_size(), fused, True) / fb / 1e6
                    speedup = f"{eager_fb / fb:>8.2f}x" if eager_fb else f"{'':>9}"
                    print(f"{norm_type:<10}{op:<10}{hidden:>7}  {impl:<8}{fwd:>9.3f}{fwd_gbs:>10,.0f}"
                          f"{100 * fwd_gbs / copy_gbs:>4.0f}%{fb:>9.3f}{fb_gbs:>10,.0f}{100 * fb_gbs / copy_gbs:>4.0f}%"
                          f"{speedup}")
                    results[norm_type, op, hidden, impl] = (fwd_gbs / copy_gbs, eager_fb / fb if eager_fb else None)
    for impl, why in skipped.items():
        print(f"{impl}: {why}")
    report_targets(results, args.rows)
    return 0


def report_targets(results: dict, rows: int) -> None:
    """The issue's targets on an H100: forward >= 90% of copy bandwidth at 16384 x 4096; fused add+norm
    forward+backward >= 3x eager."""
    for (norm_type, op, hidden, impl), (copy_fraction, speedup) in sorted(results.items()):
        if impl != "triton" or norm_type == "dyt":  # the targets are the RMSNorm / LayerNorm kernels
            continue
        if op == "norm" and hidden == 4096 and rows == 16384:
            print(f"target {norm_type} forward >= 90% of copy bandwidth at 16384x4096: {100 * copy_fraction:.0f}% "
                  f"({'met' if copy_fraction >= 0.9 else 'NOT met'})")
        if op == "add_norm" and speedup is not None:
            print(f"target {norm_type} add_norm forward+backward >= 3x eager at hidden {hidden}: {speedup:.2f}x "
                  f"({'met' if speedup >= 3 else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
