"""The bill before the queue: GPU-hours = tokens x training FLOPs per token / (assumed MFU x the GPU's peak FLOP/s),
per cell and for the study (the study file's cost: gpu_peak_tflops and mfu; defaults 989 TFLOP/s, H100 SXM dense
bf16, at 40% MFU)."""

from __future__ import annotations

from normtron.trainer.study.spec import Cell, Study


def gpu_hours(study: Study, cell: Cell) -> float:
    peak = study.cost["gpu_peak_tflops"] * 1e12 * study.cost["mfu"]
    return cell.tokens * cell.flops_per_token / peak / 3600


def cost_summary(study: Study) -> str:
    """One line per distinct cell shape (GPUs, tokens, FLOPs/token) and a total; '' when no cell asks for GPUs."""
    cells = [c for c in study.cells if c.resources.gpus]
    if study.launcher != "slurm" or not cells:
        return ""
    shapes: dict[tuple, list[Cell]] = {}
    for cell in cells:
        shapes.setdefault((cell.resources.gpus, cell.tokens, cell.flops_per_token), []).append(cell)
    lines = [f"cost estimate (assuming {study.cost['mfu']:.0%} MFU of {study.cost['gpu_peak_tflops']:g} TFLOP/s "
             f"per GPU):"]
    for (gpus, tokens, fpt), group in shapes.items():
        hours = gpu_hours(study, group[0])
        lines.append(f"  {len(group)} cell(s) x {gpus} GPUs, {tokens / 1e9:.3g}B tokens x {fpt / 1e9:.3g} GFLOP/token: "
                     f"{_hours(hours)} GPU-hours each ({hours / gpus:.1f} h wall)")
    total = sum(gpu_hours(study, c) for c in cells)
    lines.append(f"  total: {_hours(total)} GPU-hours for {len(study.cells)} cells")
    return "\n".join(lines)


def _hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"
