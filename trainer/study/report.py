"""The report of a study, built only from what its runs wrote (metrics.jsonl, config.yaml, the study's status
files), so `normtron study --report-only` rebuilds it at any time, also while cells still run: finished cells are
reported, running ones listed with their latest step, missing ones marked. Divergence is counted per cell across
seeds ("diverged 2 of 5 seeds"), and a study's `published:` numbers are put next to the measured ones.

<output_dir>/report/: report.md (tables), runs.csv (one row per run), cells.csv (seeds aggregated), report.json
(everything, with the curves and per-layer profiles), and PNG plots: loss_curves, grad_norm_profile,
residual_variance, max_attn_logit, lr_sensitivity, and lr_transfer when the grid has both training.lr and model.dim
(Tensor Programs V's Figure 1: final loss against lr, one line per width, one panel per other combination, with the
best lr of each width in report.md).

A run counts as diverged when it stopped on a non-finite loss, or when its final validation loss is non-finite or
above ln(vocab_size), the loss of predicting uniformly at random; its steps to divergence are the first logged step
whose training loss is non-finite or above that bound.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from itertools import product
from pathlib import Path

import yaml

from normtron.trainer.study.spec import SEED_KEY, Cell, Study
from normtron.trainer.study.tracking import cell_status, last_metrics, read_record

PLACEMENT = "model.placement"
LR, WIDTH = "training.lr", "model.dim"
ENDED = ("finished", "diverged")


def read_run(study: Study, cell: Cell) -> dict:
    """One run's numbers: status, curves, diagnostics, final losses, divergence."""
    rows = []
    metrics = cell.run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    status = cell_status(study, cell)
    config = cell.run_dir / "config.yaml"
    vocab = yaml.safe_load(config.read_text())["model"]["vocab_size"] if config.is_file() else None
    bound = math.log(vocab) if vocab else math.inf
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    diags = [r for r in rows if "layer_grad_norm" in r or "resid_rms" in r]
    final_val = evals[-1][1] if evals and status == "finished" else None
    blown = next((s for s, loss in train if not math.isfinite(loss) or loss > bound), None)
    diverged = status == "diverged" or (final_val is not None and not (math.isfinite(final_val) and final_val <= bound))
    if status == "diverged":
        step_file = read_record(study, cell).get("step")
        blown = min(s for s in (blown, step_file) if s is not None) if (blown or step_file) else None
    return {"name": cell.name, **{k: v for k, v in cell.values.items()}, "status": status, "diverged": diverged,
            "steps_to_divergence": blown if diverged else None,
            "final_val_loss": final_val if not diverged else None,
            "final_train_loss": train[-1][1] if train else None, "step": train[-1][0] if train else 0,
            "rollbacks": sum(r.get("event") == "rollback" for r in rows),
            "train_curve": train, "val_curve": evals, "diagnostics": diags, **task_metrics(rows)}


def task_metrics(rows: list[dict]) -> dict[str, float]:
    """The newest value of each downstream-task metric (eval/<task>/<metric>: eval.tasks or `normtron eval`)."""
    return {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}


def task_columns(runs: list[dict]) -> list[str]:
    return sorted({k for r in runs for k in r if k.startswith("eval/")})


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(study: Study, runs: list[dict]) -> list[dict]:
    """Runs grouped over seeds: final val loss mean/std (of non-diverged runs), diverged count, steps to divergence."""
    axes = [a for a in study.axes if a != SEED_KEY]
    cells = []
    for combo in product(*(study.grid[a] for a in axes)):
        key = dict(zip(axes, combo))
        group = [r for r in runs if all(r[a] == v for a, v in key.items())]
        finals = [r["final_val_loss"] for r in group if r["final_val_loss"] is not None]
        div_steps = [r["steps_to_divergence"] for r in group if r["diverged"] and r["steps_to_divergence"]]
        end_logits = [max(r["diagnostics"][-1]["max_attn_logit"]) for r in group
                      if r["diagnostics"] and "max_attn_logit" in r["diagnostics"][-1] and not r["diverged"]]
        mean, std = _mean_std(finals)
        published = _published_value(study, key)
        tasks = {k: _mean_std([r[k] for r in group if k in r and not r["diverged"]])[0] for k in task_columns(group)}
        cells.append({**key, "runs": len(group), "done": sum(r["status"] in ENDED for r in group),
                      "diverged": sum(r["diverged"] for r in group), "rollbacks": sum(r["rollbacks"] for r in group),
                      "val_loss_mean": mean, "val_loss_std": std,
                      "steps_to_divergence": statistics.fmean(div_steps) if div_steps else None,
                      "max_attn_logit_end": statistics.fmean(end_logits) if end_logits else None,
                      "measured": _measured(study, mean), "published": published, **tasks})
    return cells


def _published_value(study: Study, key: dict) -> float | None:
    """The paper's number for a cell (by its value of the published axis), if the study file gives one."""
    p = study.published
    if not p or p["axis"] not in key:
        return None
    return p["values"].get(key[p["axis"]])


def _measured(study: Study, val_loss_mean: float | None) -> float | None:
    """The measured value in the published metric: perplexity = exp(mean final val loss), or the loss itself."""
    if val_loss_mean is None or not study.published:
        return None
    return math.exp(val_loss_mean) if study.published["metric"] == "perplexity" else val_loss_mean


def diverged_text(cell: dict, study: Study) -> str:
    """"diverged 2 of 5 seeds" (the Peri-LN paper's way), with the runs that have not ended yet."""
    unit = "seeds" if SEED_KEY in study.grid else "runs"
    text = f"{cell['diverged']} of {cell['runs']} {unit}"
    return text + (f" ({cell['runs'] - cell['done']} not ended)" if cell["done"] < cell["runs"] else "")


def reference_runs(study: Study, runs: list[dict], free: tuple[str, ...]) -> list[dict]:
    """Runs at the reference value of every axis except seeds and the `free` ones (default: the first value,
    and the deepest model for model.n_layers)."""
    fixed = {}
    for axis, values in study.grid.items():
        if axis == SEED_KEY or axis in free:
            continue
        default = max(values) if axis == "model.n_layers" else values[0]
        fixed[axis] = study.reference.get(axis, default)
    return [r for r in runs if all(r[a] == v for a, v in fixed.items()) and r["status"] != "missing"]


def _series_key(study: Study, run: dict) -> str:
    """The line a run belongs to: its placement, plus any other free axis in the grid (e.g. QK-norm)."""
    parts = [f"{a.split('.')[-1]}={run[a]}" for a in study.axes if a not in (SEED_KEY,) and a in _series_axes(study)]
    return ", ".join(parts) or "all"


def _series_axes(study: Study) -> tuple[str, ...]:
    return tuple(a for a in (PLACEMENT, "model.qk_norm") if a in study.grid)


def _mean_profile(runs: list[dict], index: int, key: str) -> list[float] | None:
    """The per-layer `key` of diagnostics row `index` (0 = first step, -1 = last), averaged over runs."""
    profiles = [r["diagnostics"][index][key] for r in runs if r["diagnostics"] and key in r["diagnostics"][index]
                and not r["diverged"]]
    if not profiles:
        return None
    return [statistics.fmean(vals) for vals in zip(*profiles)]


def _grouped(study: Study, runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(_series_key(study, run), []).append(run)
    return groups


def _legend(ax, fontsize: int) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing to label while no run has data yet
        ax.legend(fontsize=fontsize)


def make_plots(study: Study, runs: list[dict], cells: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    series = _series_axes(study)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # Loss curves: one panel per combination of the other axes, one line per series (mean over seeds).
    others = [a for a in study.axes if a not in (SEED_KEY, *series)]
    combos = list(product(*(study.grid[a] for a in others)))[:12]
    cols = min(3, len(combos))
    fig, axes = plt.subplots(math.ceil(len(combos) / cols), cols, figsize=(5 * cols, 3.4 * math.ceil(len(combos) / cols)),
                             squeeze=False)
    for ax, combo in zip(axes.flat, combos):
        subset = [r for r in runs if all(r[a] == v for a, v in zip(others, combo))]
        for label, group in sorted(_grouped(study, subset).items()):
            curves = [dict(r["train_curve"]) for r in group if r["train_curve"]]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            ys = [statistics.fmean(c[s] for c in curves) for s in steps]
            ax.plot(steps, [y if math.isfinite(y) else float("nan") for y in ys], label=label)
        ax.set_title(", ".join(f"{a.split('.')[-1]}={v}" for a, v in zip(others, combo)) or "all runs", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_ylim(top=min(12, ax.get_ylim()[1]))
    _legend(axes.flat[0], 7)
    for ax in list(axes.flat)[len(combos):]:
        ax.axis("off")
    save(fig, "loss_curves.png")

    ref = _grouped(study, reference_runs(study, runs, series))
    ref_title = ", ".join(f"{a.split('.')[-1]}={study.reference.get(a, max(v) if a == 'model.n_layers' else v[0])}"
                          for a, v in study.grid.items() if a not in (SEED_KEY, *series))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, index, when in ((axes[0], 0, "step 1 (init)"), (axes[1], -1, "last step")):
        for label, group in sorted(ref.items()):
            profile = _mean_profile(group, index, "layer_grad_norm")
            if profile:
                ax.plot(range(len(profile)), profile, marker="o", label=label)
        ax.set_yscale("log")
        ax.set_title(f"per-layer grad norm at {when}\n{ref_title}", fontsize=9)
        ax.set_xlabel("layer")
    axes[0].set_ylabel("grad norm of the block's parameters")
    _legend(axes[0], 7)
    save(fig, "grad_norm_profile.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.tab10.colors
    for n, (label, group) in enumerate(sorted(ref.items())):
        for index, style in ((0, ":"), (-1, "-")):  # same color per series: dotted at init, solid at the end
            profile = _mean_profile(group, index, "resid_var")
            if profile:
                ax.plot(range(1, len(profile) + 1), profile, style, marker="o", color=colors[n % len(colors)],
                        label=label if index == -1 else None)
    ax.set_yscale("log")
    ax.set_xlabel("block (depth)")
    ax.set_ylabel("residual-stream variance at block output")
    ax.set_title(f"{ref_title} (dotted: step 1, solid: last step)", fontsize=9)
    _legend(ax, 6)
    save(fig, "residual_variance.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, group in sorted(ref.items()):
        curves = [{d["step"]: max(d["max_attn_logit"]) for d in r["diagnostics"] if "max_attn_logit" in d}
                  for r in group]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("max attention logit (max over layers)")
    ax.set_title(ref_title, fontsize=9)
    _legend(ax, 7)
    save(fig, "max_attn_logit.png")

    if "training.lr" in study.grid:
        rest = [a for a in study.axes if a not in (SEED_KEY, "training.lr", *series)]
        combos = list(product(*(study.grid[a] for a in rest)))[:6]
        fig, axes = plt.subplots(1, len(combos), figsize=(5 * len(combos), 3.8), squeeze=False)
        for ax, combo in zip(axes.flat, combos):
            subset = [c for c in cells if all(c[a] == v for a, v in zip(rest, combo))]
            lines: dict[str, list] = {}
            for c in subset:
                label = ", ".join(f"{a.split('.')[-1]}={c[a]}" for a in series) or "all"
                lines.setdefault(label, []).append(c)
            for label, group in sorted(lines.items()):
                group.sort(key=lambda c: c["training.lr"])
                line, = ax.plot([c["training.lr"] for c in group],
                                [c["val_loss_mean"] if c["val_loss_mean"] is not None else float("nan") for c in group],
                                marker="o", label=label)
                crashed = [c["training.lr"] for c in group if c["diverged"]]
                if crashed:
                    ax.plot(crashed, [ax.get_ylim()[1]] * len(crashed), "x", color=line.get_color(), markersize=9)
            ax.set_xscale("log")
            ax.set_xlabel("peak learning rate")
            ax.set_ylabel("final val loss (mean over seeds; x = a diverged run)")
            ax.set_title(", ".join(f"{a.split('.')[-1]}={v}" for a, v in zip(rest, combo)) or "all", fontsize=9)
        _legend(axes.flat[0], 7)
        save(fig, "lr_sensitivity.png")
    if LR in study.grid and WIDTH in study.grid:
        fig = lr_transfer_plot(plt, study, cells)
        save(fig, "lr_transfer.png")
    return written


def _transfer_panels(study: Study, cells: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """Panel title -> width -> that width's cells (sorted by lr), for each combination of the axes other than lr,
    width and seed (e.g. parametrization x optimizer)."""
    rest = [a for a in study.axes if a not in (SEED_KEY, LR, WIDTH)]
    panels: dict[str, dict[int, list[dict]]] = {}
    for combo in product(*(study.grid[a] for a in rest)):
        title = ", ".join(f"{a.split('.')[-1]}={v}" for a, v in zip(rest, combo)) or "all"
        subset = [c for c in cells if all(c[a] == v for a, v in zip(rest, combo))]
        panels[title] = {w: sorted((c for c in subset if c[WIDTH] == w), key=lambda c: c[LR])
                         for w in study.grid[WIDTH]}
    return panels


def _best_lr(group: list[dict]) -> float | None:
    done = [c for c in group if c["val_loss_mean"] is not None]
    return min(done, key=lambda c: c["val_loss_mean"])[LR] if done else None


def lr_transfer_plot(plt, study: Study, cells: list[dict]):
    """Final validation loss against lr, one line per width (a star at its best lr), one panel per combination of
    the other axes: under µP the minima line up across widths, under the standard parametrization they drift."""
    panels = _transfer_panels(study, cells)
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False, sharey=True)
    colors = plt.cm.viridis
    for ax, (title, widths) in zip(axes.flat, panels.items()):
        for n, (width, group) in enumerate(widths.items()):
            color = colors(n / max(1, len(widths) - 1))
            losses = [c["val_loss_mean"] if c["val_loss_mean"] is not None else float("nan") for c in group]
            ax.plot([c[LR] for c in group], losses, marker="o", color=color, label=f"width {width}")
            best = _best_lr(group)
            if best is not None:
                ax.plot([best], [min(v for v in losses if v == v)], "*", color=color, markersize=13)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title(title, fontsize=9)
        _legend(ax, 7)
    for ax in axes[:, 0]:
        ax.set_ylabel("final val loss (mean over seeds)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return fig


def lr_transfer_lines(study: Study, cells: list[dict]) -> list[str]:
    """report.md's table of the best lr per width in each panel of lr_transfer.png."""
    if LR not in study.grid or WIDTH not in study.grid:
        return []
    widths = study.grid[WIDTH]
    lines = ["", "## Learning-rate transfer", "",
             "Best peak lr (lowest final validation loss, mean over seeds) per width; see lr_transfer.png.", "",
             "| | " + " | ".join(f"width {w}" for w in widths) + " |", "|---|" + "---|" * len(widths)]
    for title, by_width in _transfer_panels(study, cells).items():
        lines.append(f"| {title} | " + " | ".join(_fmt(_best_lr(by_width[w])) for w in widths) + " |")
    return lines


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def write_report(study: Study) -> Path:
    """Build <output_dir>/report/ from the runs on disk; returns the report directory."""
    out = study.output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(study, cell) for cell in study.cells]
    cells = aggregate(study, runs)
    axes = [a for a in study.axes if a != SEED_KEY]
    run_columns = ["name", *study.axes, "status", "step", "diverged", "steps_to_divergence", "final_val_loss",
                   "final_train_loss", "rollbacks", *task_columns(runs)]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=run_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    cell_columns = [*axes, "runs", "done", "diverged", "rollbacks", "val_loss_mean", "val_loss_std",
                    "steps_to_divergence", "max_attn_logit_end", *(["measured", "published"] if study.published else []),
                    *task_columns(runs)]
    with open(out / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cell_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(cells)
    (out / "report.json").write_text(json.dumps({"study": str(study.path), "grid": study.grid, "cells": cells,
                                                 "runs": runs}, indent=1, default=str))
    plots = make_plots(study, runs, cells, out)

    published = study.published
    metric = published.get("metric", "")
    lines = [f"# Study report: {study.path.name}", "",
             f"Base config `{study.base.name}`, overrides {study.overrides or 'none'}; grid: "
             + ", ".join(f"`{k}` ∈ {v}" for k, v in study.grid.items()) + ".", "",
             (f"{sum(r['status'] in ENDED for r in runs)}/{len(runs)} runs done, "
              f"{sum(r['diverged'] for r in runs)} diverged. Final validation loss: mean ± std over seeds of the "
              f"runs that did not diverge. A run diverged if it stopped on a non-finite loss or ended above "
              f"ln(vocab) (uniform guessing)."), "",
             "| " + " | ".join(a.split(".")[-1] for a in axes) + " | runs done | diverged | rollbacks | "
             "final val loss | "
             + (f"measured {metric} | published {metric} | " if published else "")
             + "steps to divergence | max attn logit (end) |"
             + "".join(f" {k.removeprefix('eval/')} |" for k in task_columns(runs)),
             "|" + "---|" * (len(axes) + 6 + 2 * bool(published) + len(task_columns(runs)))]
    for c in cells:
        loss = "–" if c["val_loss_mean"] is None else f"{c['val_loss_mean']:.4f} ± {c['val_loss_std']:.4f}"
        side = f"{_fmt(c['measured'])} | {_fmt(c['published'])} | " if published else ""
        lines.append("| " + " | ".join(_fmt(c[a]) for a in axes) + f" | {c['done']}/{c['runs']} | "
                     f"{diverged_text(c, study)} | {c['rollbacks']} | {loss} | {side}"
                     f"{_fmt(c['steps_to_divergence'])} | "
                     f"{_fmt(c['max_attn_logit_end'], 3)} |" + "".join(f" {_fmt(c.get(k))} |" for k in task_columns(runs)))
    if published:
        lines += ["", f"Published {metric}: {published.get('source') or 'as given in the study file'} "
                      f"(by `{published['axis']}`)."]
    lines += lr_transfer_lines(study, cells)
    unfinished = [r for r in runs if r["status"] not in ENDED]
    if unfinished:
        lines += ["", "## Runs not finished", "", "| run | status | step | last train loss |", "|---|---|---|---|"]
        for run, cell in ((r, c) for r, c in zip(runs, study.cells) if r["status"] not in ENDED):
            state = {"missing": "missing (not started)", "running": "running / interrupted"}.get(run["status"],
                                                                                                run["status"])
            if run["status"] == "failed":
                state += f" (log `{read_record(study, cell).get('log', study.log_file(cell))}`)"
            loss = last_metrics(cell).get("loss")
            lines.append(f"| {run['name']} | {state} | {run['step']}/{cell.steps} | {_fmt(loss)} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Raw numbers: `runs.csv`, `cells.csv`, `report.json` (curves and per-layer diagnostics)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out
