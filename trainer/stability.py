"""Training stability guards the loop calls once per step: loss-spike detection, the non-finite action; and what the
z-loss (in trainer/loss.py) is for.

    spike         z = (loss - mean) / std over the last `stability.spike_window` finite, non-spike losses;
                  z > `stability.spike_zscore` is a spike: warned about and recorded (training goes on)
    non-finite    a NaN/inf loss or gradient norm; `stability.nonfinite` says what happens:
                  stop  end the run with an error; the newest checkpoint predates the divergence (no checkpoint
                        is ever written from a non-finite state)
                  skip  drop the step's update (the engine zeroes the gradients instead of stepping), count it and
                        go on; the learning-rate schedule and the data still advance
                  log   warn, record it and go on
                  rollback  reload the newest checkpoint from before the event, skip the next
                        `stability.rollback_skip_batches` batches (default: those from that checkpoint through the
                        event's step) and train on from there; the step count, schedule and tokens_seen are the
                        checkpoint's (honest), only the data position moves on; at most `stability.max_rollbacks`
                        for events within `stability.rollback_window` steps, one more stops the run (PaLM sec. 5.1
                        restarts ~100 steps before a spike and skips 200-500 batches by hand)
    spike action  `stability.on_spike`: log (warn and record) or rollback (as above)
    z-loss        `stability.z_loss` * mean(logsumexp(logits)^2) added to the training loss (PaLM), which keeps
                  the softmax normalizer near 1 and the output logits from drifting

A rollback is an event row ("rollback": the event's step, the checkpoint step returned to, the batches skipped);
the rows of the undone steps are dropped from metrics.jsonl, as on a resume, so each step appears once.
Spike detection, `skip` and `rollback` need the loss and gradient norm of every step, which costs one host-device
sync per step; with `spike_window: 0` and `nonfinite: stop|log` they are read on logging and checkpoint steps only.
"""

from __future__ import annotations

import math
from collections import deque

from normtron.trainer.errors import UserError
from normtron.trainer.metrics import LOG, MetricsLogger


class SpikeDetector:
    """z-score of each loss against the running mean and std of the previous `window` normal losses."""

    def __init__(self, window: int, threshold: float):
        self.history: deque[float] = deque(maxlen=window)
        self.threshold = threshold
        self.min_history = max(2, window // 2)  # too few losses give a meaningless std

    def update(self, loss: float) -> float | None:
        """The loss's z-score (None while the history is short); spikes are kept out of the history."""
        z = None
        if len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.history) / len(self.history))
            z = (loss - mean) / std if std > 0 else 0.0
        if z is None or z <= self.threshold:
            self.history.append(loss)
        return z

    def is_spike(self, z: float | None) -> bool:
        return z is not None and z > self.threshold


class StabilityMonitor:
    """Applies the non-finite action and spike detection to each step's (loss, grad norm); events are warned about
    and written to metrics.jsonl as rows with an "event" key."""

    def __init__(self, nonfinite: str, spike_window: int, spike_zscore: float, metrics: MetricsLogger,
                 previous_events: list[str] = (), on_spike: str = "log"):
        self.nonfinite, self.on_spike, self.metrics = nonfinite, on_spike, metrics
        self.spike_window, self.spike_zscore = spike_window, spike_zscore
        self.restart()
        # Counts continue across a resume from the events already recorded (the detector's window starts afresh).
        self.skipped_steps = previous_events.count("skipped_step")
        self.loss_spikes = previous_events.count("loss_spike")
        self.rollbacks = previous_events.count("rollback")
        self.spiked = False

    def restart(self) -> None:
        """A fresh spike window, as on a resume (after a rollback the undone steps' losses no longer count)."""
        self.spikes = SpikeDetector(self.spike_window, self.spike_zscore) if self.spike_window > 0 else None

    @property
    def every_step(self) -> bool:
        """Whether the loop must read the loss and grad norm on every step."""
        return self.spikes is not None or self.nonfinite in ("skip", "rollback")

    def rollback_reason(self, finite: bool) -> str | None:
        """The event ("nonfinite" or "loss_spike") of the step just observed that calls for a rollback, or None."""
        if not finite and self.nonfinite == "rollback":
            return "nonfinite"
        if self.spiked and self.on_spike == "rollback":
            return "loss_spike"
        return None

    def observe(self, step: int, loss: float, grad_norm: float, skipped: bool) -> bool:
        """Check one step; returns whether the model state is finite (safe to checkpoint and go on)."""
        self.spiked = False
        if math.isfinite(loss) and math.isfinite(grad_norm):
            if self.spikes is not None:
                z = self.spikes.update(loss)
                if self.spikes.is_spike(z):
                    self.spiked = True
                    self.loss_spikes += 1
                    self._event(step, "loss_spike", loss, grad_norm, f"loss spike at step {step}: loss {loss:.4f} "
                                f"is {z:.1f} std above the running mean")
            return True
        if skipped:
            self.skipped_steps += 1
            self._event(step, "skipped_step", loss, grad_norm, f"step {step} skipped: non-finite loss {loss} / "
                        f"grad norm {grad_norm}; no update applied ({self.skipped_steps} skipped so far)")
            return True
        self._event(step, "nonfinite", loss, grad_norm, f"non-finite loss {loss} / grad norm {grad_norm} at step "
                    f"{step}", warn=self.nonfinite in ("log", "rollback"))
        return False

    def stop(self, step: int, loss: float, grad_norm: float, newest_checkpoint) -> UserError | None:
        """The error that ends the run after a non-finite step under `nonfinite: stop` (None otherwise)."""
        if self.nonfinite != "stop":
            return None
        return UserError(f"training diverged at step {step} (loss {loss}, grad norm {grad_norm}); the newest "
                         f"checkpoint ({newest_checkpoint or 'none'}) predates it; lower training.lr or raise "
                         f"training.warmup_steps and start again (or set stability.nonfinite=skip)")

    def _event(self, step: int, event: str, loss: float, grad_norm: float, message: str, warn: bool = True) -> None:
        if warn:
            LOG.warning(message)
        self.metrics.log({"step": step, "event": event, "event_loss": loss, "event_grad_norm": grad_norm},
                         quiet=True)

    def counters(self) -> dict:
        """Counts for the training log row (over the whole run)."""
        return {"skipped_steps": self.skipped_steps, "loss_spikes": self.loss_spikes, "rollbacks": self.rollbacks}


class RollbackLimit:
    """`stability.max_rollbacks` rollbacks for events within `stability.rollback_window` steps; the steps of earlier
    rollbacks (recorded in metrics.jsonl) count across a resume."""

    def __init__(self, max_rollbacks: int, window: int, previous_steps: list[int]):
        self.max_rollbacks, self.window = max_rollbacks, window
        self.steps = list(previous_steps)

    def admit(self, step: int) -> UserError | None:
        """Record a rollback for an event at `step`, or the error that stops the run when it is one too many."""
        recent = [s for s in self.steps if s > step - self.window]
        if len(recent) >= self.max_rollbacks:
            return UserError(f"training diverged again at step {step} after {len(recent)} rollback(s) for events "
                             f"within {self.window} steps (stability.max_rollbacks={self.max_rollbacks}); lower "
                             f"training.lr or raise stability.rollback_skip_batches and start again")
        self.steps.append(step)
        return None
