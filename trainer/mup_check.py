"""`normtron mup-check`: the coordinate check of µP (Yang et al. 2022, "Tensor Programs V", Sec. 7 / Fig. 5, and
microsoft/mup's `get_coord_data`).

The config's model is trained for a few steps at several widths (dim; SwiGLU hidden size in proportion, heads and
depth fixed), under the standard parametrization and under µP, on the config's data with the config's optimizer at
a constant learning rate (training.lr, no warmup: the check is about the size of the updates). At every step the
mean |x| of the embedding output, of each block's output (the residual stream) and of the logits is recorded.
Under µP these coordinate sizes stay flat as the width grows; under the standard parametrization with Adam they grow
with it (the updates of hidden and output weights scale with fan_in). Writes coord.csv (every value), coord.md (the
last step's values per width and the spread max/min over widths) and coord.png.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

import torch

from normtron.models.transformer import Transformer
from normtron.models.config import ModelConfig
from normtron.trainer.config import Config
from normtron.trainer.errors import UserError
from normtron.trainer.loss import cross_entropy
from normtron.trainer.optim import build_optimizer

PARAMETRIZATIONS = ("standard", "mup")


def width_config(model: ModelConfig, width: int, parametrization: str, base: int) -> ModelConfig:
    """The config's model at `width`: SwiGLU hidden size scaled in proportion, same heads and depth."""
    hidden = max(2, round(model.hidden_dim * width / model.dim))
    cfg = dataclasses.replace(model, dim=width, ffn_hidden_dim=hidden, parametrization=parametrization,
                              mup_base_dim=base)
    try:
        cfg.validate()
    except ValueError as err:
        raise UserError(f"--widths {width}: {err}") from None
    return cfg


def activation_sizes(cfg: Config, model_cfg: ModelConfig, steps: int) -> list[dict]:
    """Rows (step, activation, mean_abs) of `steps` training steps of one model, recorded in each step's forward."""
    from normtron.trainer.data.mixture import make_batches, open_sources

    torch.manual_seed(cfg.run.seed)
    model = Transformer(model_cfg)
    model.init_weights(seed=cfg.run.seed)
    training = dataclasses.replace(cfg.training, warmup_steps=0)
    optimizer = build_optimizer(model, training, model_cfg)
    batches = make_batches(open_sources(cfg.data), cfg.data.seq_len, cfg.training.batch_size, 0, 1, cfg.run.seed)
    sizes: dict[str, float] = {}

    def record(name):
        def hook(_module, _inputs, output):
            if isinstance(output, tuple):  # a block's output with its residual add pending: (out, skip)
                output = output[0] if output[1] is None else output[0] + output[1]
            sizes[name] = output.detach().abs().mean().item()
        return hook

    model.tok_embeddings.register_forward_hook(record("embedding"))
    for index, layer in model.layers.items():
        layer.register_forward_hook(record(f"block {index}"))
    rows = []
    for step in range(1, steps + 1):
        inputs, targets = batches.next_batch()
        logits = model(inputs)
        sizes["logits"] = logits.detach().abs().mean().item()
        rows += [{"step": step, "activation": name, "mean_abs": value} for name, value in sizes.items()]
        cross_entropy(logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return rows


def mup_check(cfg: Config, widths: list[int] | None, steps: int, out_dir: Path | None) -> Path:
    """Run the check and write coord.csv, coord.md and coord.png into `out_dir` (default
    <run.output_dir>/mup-check); returns that directory."""
    from normtron.trainer.data.mixture import open_sources
    from normtron.trainer.train import resolve_vocab_size

    if steps < 1:
        raise UserError(f"--steps must be at least 1, not {steps}")
    base = cfg.model.mup_base_dim or cfg.model.dim
    widths = sorted(widths or [base, 2 * base, 3 * base, 4 * base])
    if len(widths) < 2 or widths[0] < 1:
        raise UserError(f"--widths needs at least two positive widths, not {widths}")
    resolve_vocab_size(cfg, open_sources(cfg.data)[0].meta)
    out = Path(out_dir) if out_dir is not None else Path(cfg.run.output_dir) / "mup-check"
    configs = {(p, w): width_config(cfg.model, w, p, base) for p in PARAMETRIZATIONS for w in widths}  # all valid?
    rows = []
    for parametrization in PARAMETRIZATIONS:
        for width in widths:
            start = time.time()
            result = activation_sizes(cfg, configs[parametrization, width], steps)
            rows += [{"parametrization": parametrization, "width": width, **row} for row in result]
            last = {r["activation"]: r["mean_abs"] for r in result if r["step"] == steps}
            print(f"mup-check {parametrization:8s} width {width:5d}: {steps} steps in {time.time() - start:.1f}s, "
                  f"step {steps} mean|x| embedding {last['embedding']:.3g}, logits {last['logits']:.3g}",
                  flush=True)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "coord.csv")
    table = summary_table(rows, widths, steps)
    (out / "coord.md").write_text(table)
    plot(rows, widths, steps, out / "coord.png")
    print(table)
    print(f"wrote {out}/coord.csv, coord.md, coord.png")
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["parametrization", "width", "step", "activation", "mean_abs"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def spreads(rows: list[dict], steps: int) -> dict[tuple[str, str], float]:
    """(parametrization, activation) -> max/min over widths of mean |x| at the last step."""
    values: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["step"] == steps:
            values.setdefault((r["parametrization"], r["activation"]), []).append(r["mean_abs"])
    return {key: max(v) / min(v) for key, v in values.items()}


def summary_table(rows: list[dict], widths: list[int], steps: int) -> str:
    """Markdown: the last step's mean |x| per width, and its spread over the widths."""
    spread = spreads(rows, steps)
    value = {(r["parametrization"], r["activation"], r["width"]): r["mean_abs"] for r in rows if r["step"] == steps}
    lines = [f"Coordinate check: mean |x| after {steps - 1} updates (the forward of step {steps}), widths "
             f"{widths[0]}..{widths[-1]} ({widths[-1] / widths[0]:g}x)", "",
             "| parametrization | activation | " + " | ".join(f"width {w}" for w in widths) + " | max/min |",
             "|---|---|" + "---|" * (len(widths) + 1)]
    for (parametrization, activation), ratio in spread.items():
        cells = " | ".join(f"{value[(parametrization, activation, w)]:.4g}" for w in widths)
        lines.append(f"| {parametrization} | {activation} | {cells} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], widths: list[int], steps: int, path: Path) -> None:
    """One panel per parametrization: mean |x| against width (log-log), one line per activation, at the last step
    (earlier steps faint), as in Tensor Programs V's Fig. 5."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    activations = list(dict.fromkeys(r["activation"] for r in rows))
    colors = {a: plt.cm.viridis(i / max(1, len(activations) - 1)) for i, a in enumerate(activations)}
    fig, axes = plt.subplots(1, len(PARAMETRIZATIONS), figsize=(11, 4), sharey=True)
    for ax, parametrization in zip(axes, PARAMETRIZATIONS):
        for activation in activations:
            for step in range(1, steps + 1):
                ys = [next(r["mean_abs"] for r in rows if r["parametrization"] == parametrization
                           and r["width"] == w and r["activation"] == activation and r["step"] == step)
                      for w in widths]
                last = step == steps
                ax.plot(widths, ys, marker="o" if last else None, color=colors[activation],
                        alpha=1.0 if last else 0.15 + 0.5 * step / steps, label=activation if last else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("width (model.dim)")
        ax.set_title(f"{'µP' if parametrization == 'mup' else 'standard'}: step {steps} (earlier steps faint)")
    axes[0].set_ylabel("mean |x|")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
