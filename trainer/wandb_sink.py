"""Weights & Biases as one more sink of the metrics logger (logging.wandb): the same rows as metrics.jsonl, events
included, and the resolved config. Rank 0 only, as every sink.

The W&B run id is kept in <run_dir>/wandb_run_id, so a resumed run (or a requeued Slurm job) continues the same W&B
run. Rows carry their training step as the "step" metric, which W&B charts use as the x-axis; W&B's own history
index only counts rows, so the rows a rollback or a resume repeats are logged again rather than dropped by W&B.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from normtron.trainer.errors import UserError

RUN_ID_FILE = "wandb_run_id"


class WandbSink:
    def __init__(self, run_dir: Path, settings, config: dict):
        """`settings`: the logging section (wandb, wandb_project, wandb_entity, wandb_name, wandb_group)."""
        import wandb

        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        if not id_file.is_file():
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(run_id + "\n")
            os.replace(tmp, id_file)
        try:
            self.run = wandb.init(
                project=settings.wandb_project, entity=settings.wandb_entity, group=settings.wandb_group,
                name=settings.wandb_name or run_dir.name, id=run_id, resume="allow", mode=settings.wandb,
                # Local files in the run directory, unless WANDB_DIR says otherwise.
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                config=config)
        except wandb.errors.Error as err:  # e.g. online without `wandb login`, or no network
            raise UserError(f"logging.wandb={settings.wandb}: W&B could not start the run "
                            f"({' '.join(str(err).split())}); run `wandb login`, or set logging.wandb=offline "
                            f"and `wandb sync` later") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def rewind(self, step: int) -> None:
        """W&B history is append-only: the rows after a rollback are logged again with their (repeated) steps."""

    def write(self, row: dict) -> None:
        flat = {}
        for key, value in row.items():
            if isinstance(value, list):  # per-layer diagnostics: one series per layer, as in TensorBoard
                flat.update({f"{key}/{i}": item for i, item in enumerate(value)})
            else:
                flat[key] = value
        self.run.log(flat)

    def close(self) -> None:
        self.run.finish()
