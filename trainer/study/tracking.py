"""Where each cell stands, kept in <output_dir>/status/<cell>.json so a killed or restarted driver loses nothing.

local / torchrun: `run_processes` trains the pending cells here, `max_parallel` at a time, and returns when all
have ended. slurm: `sync_slurm` reads the jobs' states (squeue/sacct), records outcomes, resubmits cells whose job
failed for another reason than divergence (up to `retries` times) and submits pending cells while fewer than
`max_parallel` are queued or running; it never blocks, and `--watch` calls it in a loop.

A record: {"status": finished|diverged|failed|cancelled (absent while a cell is pending or has a job),
"jobs": [Slurm job ids, oldest first], "job_name", "submitting" (set while sbatch runs: a driver killed then finds
the job by name instead of submitting again), "returncode", "step", "message", "log"}.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from normtron.trainer.checkpoint import complete_checkpoints
from normtron.trainer.errors import Stopped
from normtron.trainer.metrics import format_duration
from normtron.trainer.study import launchers
from normtron.trainer.study.spec import Cell, Study

DIVERGED = re.compile(r"training diverged at step (\d+)")


def read_record(study: Study, cell: Cell) -> dict:
    path = study.status_file(cell)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_record(study: Study, cell: Cell, record: dict) -> None:
    """Atomically (write + rename), so a driver killed mid-write leaves the previous record."""
    path = study.status_file(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def finished(cell: Cell) -> bool:
    done = complete_checkpoints(cell.run_dir / "checkpoints")
    return bool(done) and done[-1][0] >= cell.steps


def last_metrics(cell: Cell) -> dict:
    """The newest training row of the run's metrics.jsonl (step, loss, eta_s), {} before the first."""
    path = cell.run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 64_000))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            return row
    return {}


def cell_status(study: Study, cell: Cell) -> str:
    """From what is on disk alone: finished | diverged | failed | cancelled | running (has trained steps, not
    finished) | missing (nothing trained yet)."""
    if finished(cell):
        return "finished"
    status = read_record(study, cell).get("status")
    if status in ("diverged", "failed", "cancelled"):
        return status
    return "running" if last_metrics(cell) else "missing"


def _outcome(study: Study, cell: Cell, record: dict, returncode: int | None) -> str:
    """finished | diverged | failed for a cell whose process or job has ended, from its checkpoints and log."""
    if finished(cell):
        record.update(status="finished")
        return "finished"
    log = study.log_file(cell)
    tail = log.read_text(errors="replace")[-6000:] if log.is_file() else ""
    match = DIVERGED.search(tail)
    record.update(status="diverged" if match else "failed", returncode=returncode,
                  step=int(match.group(1)) if match else None, log=str(log),
                  message=tail.strip().splitlines()[-1] if tail.strip() else "")
    return record["status"]


# --- local and torchrun ----------------------------------------------------------------------------------------------

def run_processes(study: Study) -> int:
    """Train every cell that is not finished or diverged, `max_parallel` at a time, printing progress; interrupted
    runs resume from their newest checkpoint (the trainer's own resume). Returns how many failed (not diverged)."""
    total = len(study.cells)
    pending = [c for c in study.cells if cell_status(study, c) not in ("finished", "diverged")]
    print(f"study {study.path}: {total} runs, {total - len(pending)} already done, {len(pending)} to run, "
          f"{study.max_parallel} at a time ({study.launcher}"
          f"{f', {study.nproc_per_cell} processes each' if study.launcher == 'torchrun' else ''})", flush=True)
    for sub in ("logs", "status"):
        (study.output_dir / sub).mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple[Cell, subprocess.Popen, float]] = {}
    done, failed, started, durations = total - len(pending), 0, time.time(), []
    # SIGTERM (a scheduler, `kill`) stops the cells like Ctrl-C does: they run in sessions of their own, so nothing
    # else would reach them.
    previous = {signum: signal.signal(signum, _STOP.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            while pending and len(running) < study.max_parallel:
                slot = next(i for i in range(study.max_parallel) if i not in running)
                cell = pending.pop(0)
                cmd, env = launchers.process_command(study, cell, slot)
                # a stop signal waits until the cell is recorded: every cell started is one _stop_cells stops (a
                # blocked signal mask would be inherited by the cell, which then could not be stopped)
                with _STOP.deferred():
                    with open(study.log_file(cell), "a") as log:  # the child keeps its own handle
                        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   start_new_session=True)
                    running[slot] = (cell, process, time.time())
                print(f"  start {cell.name}", flush=True)
            time.sleep(0.2)
            for slot, (cell, process, t0) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[slot]
                durations.append(time.time() - t0)
                record = {}
                outcome = _outcome(study, cell, record, process.returncode)
                if outcome == "finished":
                    study.status_file(cell).unlink(missing_ok=True)
                else:
                    write_record(study, cell, record)
                done += outcome != "failed"
                failed += outcome == "failed"
                remaining = len(pending) + len(running)
                eta = sum(durations) / len(durations) * remaining / study.max_parallel
                print(f"[{done}/{total} done{f', {failed} failed' if failed else ''}] {cell.name}: {outcome} in "
                      f"{format_duration(durations[-1])} | elapsed {format_duration(time.time() - started)}, "
                      f"ETA {format_duration(eta)}", flush=True)
    except Stopped as stop:  # SIGINT too: _STOP.handle replaces Python's KeyboardInterrupt here
        raise Stopped(stop.signum, _stop_cells(running.values(), signal.Signals(stop.signum).name,
                                               study.launcher == "torchrun")) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return failed


class _StopSignals:
    """SIGTERM/SIGINT raise Stopped, except inside `deferred()`, which raises it at its end."""

    def __init__(self):
        self.deferring, self.pending = False, None

    def handle(self, signum: int, frame) -> None:
        if self.deferring:
            self.pending = signum
        else:
            raise Stopped(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring, self.pending = True, None
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            raise Stopped(self.pending)


_STOP = _StopSignals()


def _stop_cells(running, reason: str, torchrun: bool, grace: float = 600) -> str:
    """SIGTERM to every cell this driver started (the trainers finish their step, checkpoint and exit), then wait
    for them, so that no cell outlives the driver and a re-run resumes each one instead of starting a second
    writer. Returns the line to print."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the wait short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cells = list(running)
    for _, process, _ in cells:
        with contextlib.suppress(ProcessLookupError):
            if torchrun:  # launch/torchrun.sh passes it on to the workers alone (the agent would stop them in 30 s)
                os.kill(process.pid, signal.SIGTERM)
            else:
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + grace
    for _, process, _ in cells:
        try:
            process.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    names = ", ".join(cell.name for cell, _, _ in cells) or "none was running"
    return (f"study stopped by {reason}: stopped its running cells ({names}), each after a checkpoint; re-run the "
            f"same command to resume them")


# --- slurm -----------------------------------------------------------------------------------------------------------

def _ended_without_finishing(study: Study, cell: Cell, record: dict, job: int, state: str) -> str:
    """diverged (recorded; a rerun would diverge again), retry (resubmit), or failed (retries spent; recorded)."""
    outcome = _outcome(study, cell, record, None)
    if outcome == "failed":
        record.update(status=None, message=f"job {job} ended {state}" + (f": {record['message']}" if record["message"]
                                                                           else f" (log {record['log']})"))
        if len(record.get("jobs", [])) <= study.retries:
            return "retry"
        record["status"] = "failed"
    return outcome


@contextlib.contextmanager
def _one_driver(study: Study, submit: bool):
    """Two drivers submitting at once (a --watch and a re-run) take turns, so neither submits what the other did."""
    if not submit:
        yield
        return
    lock = study.output_dir / "status" / ".submit.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def sync_slurm(study: Study, submit: bool = True, resume_cancelled: bool = False, say=print) -> list[dict]:
    """One pass over the study's cells: states from Slurm, outcomes recorded, failed jobs resubmitted, pending cells
    (and cancelled ones, with resume_cancelled) submitted up to max_parallel queued or running. Returns one row per
    cell for the status table."""
    with _one_driver(study, submit):
        return _sync_slurm(study, submit, resume_cancelled, say)


def _sync_slurm(study: Study, submit: bool, resume_cancelled: bool, say) -> list[dict]:
    records = {cell.name: read_record(study, cell) for cell in study.cells}
    for cell in study.cells:  # a driver killed inside sbatch: adopt the job it may have submitted
        record = records[cell.name]
        if record.pop("submitting", False):
            known = set(record.get("jobs", []))
            record["jobs"] = record.get("jobs", []) + [j for j in launchers.jobs_named(record["job_name"])
                                                        if j not in known]
            write_record(study, cell, record)
    latest = {name: r["jobs"][-1] for name, r in records.items() if r.get("jobs")}
    states = launchers.job_states(list(latest.values()))
    rows = []
    for cell in study.cells:
        record, job = records[cell.name], latest.get(cell.name)
        before = dict(record)
        state = record.get("status")
        if finished(cell):
            state = record["status"] = "finished"
        elif state in ("diverged", "failed", "cancelled"):
            pass
        elif job is None:
            state = "waiting"  # for a max_parallel slot
        elif states.get(job) in launchers.ACTIVE_STATES:
            state = states[job]
        else:
            state = _ended_without_finishing(study, cell, record, job, states.get(job, "UNKNOWN"))
            if state == "retry":
                say(f"{cell.name}: {record['message']}; {'resubmitting' if submit else 'to be resubmitted'} "
                    f"(retry {len(record['jobs'])} of {study.retries})")
            elif state == "failed":
                say(f"{cell.name}: job {job} failed after {len(record['jobs'])} attempt(s); log {record['log']}")
        if record != before:
            write_record(study, cell, record)
        rows.append({"cell": cell, "job": job, "state": state, "record": record})
    if submit:
        (study.output_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create it
        active = sum(r["state"] in launchers.ACTIVE_STATES for r in rows)
        for row in rows:
            if active >= study.max_parallel:
                break
            if row["state"] not in ("waiting", "retry", *(("cancelled",) if resume_cancelled else ())):
                continue
            cell, record = row["cell"], row["record"]
            record.update(status=None, submitting=True, job_name=launchers.job_name(study, cell))
            write_record(study, cell, record)
            job = launchers.submit(study, cell)
            record.pop("submitting")
            record["jobs"] = record.get("jobs", []) + [job]
            write_record(study, cell, record)
            row.update(job=job, state="PENDING")
            active += 1
    return rows


def cancel_slurm(study: Study) -> int:
    """scancel the study's queued and running jobs and mark their cells cancelled; returns how many."""
    rows = sync_slurm(study, submit=False, say=lambda _: None)
    active = [r for r in rows if r["state"] in launchers.ACTIVE_STATES]
    launchers.cancel([r["job"] for r in active])
    for row in active:
        write_record(study, row["cell"], {**row["record"], "status": "cancelled"})
    return len(active)


def local_rows(study: Study) -> list[dict]:
    return [{"cell": c, "job": None, "state": cell_status(study, c), "record": read_record(study, c)}
            for c in study.cells]


def _eta(row: dict, total: int) -> float | None:
    """Seconds left at the run's latest throughput (tokens/s over its last logging interval)."""
    if not row.get("tokens_per_sec") or not row.get("step"):
        return None
    return (total - row["step"]) * row["tokens_seen"] / row["step"] / row["tokens_per_sec"]


def status_table(rows: list[dict]) -> str:
    """cell | job | state | step/total | loss | ETA, one line per cell, then the count per state."""
    lines = [("cell", "job", "state", "step", "loss", "ETA")]
    for row in rows:
        cell, job, record = row["cell"], row["job"], row["record"]
        last = last_metrics(cell)
        attempts = len(record.get("jobs", []))
        job_text = "-" if job is None else f"{job}" + (f" (try {attempts})" if attempts > 1 else "")
        running = row["state"] in launchers.ACTIVE_STATES or row["state"] == "running"
        lines.append((cell.name, job_text, row["state"], f"{last.get('step', 0)}/{cell.steps}",
                      f"{last['loss']:.4f}" if "loss" in last else "-",
                      format_duration(eta) if running and (eta := _eta(last, cell.steps)) is not None else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    text = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    text.append(", ".join(f"{n} {state.lower()}" for state, n in counts.items()))
    return "\n".join(text)


def study_ended(rows: list[dict]) -> bool:
    return all(r["state"] in ("finished", "diverged", "failed", "cancelled") for r in rows)


def watch_slurm(study: Study, poll: float) -> list[dict]:
    """sync_slurm until every cell has ended, printing the table whenever a cell's state or step changed."""
    shown, first = None, True
    while True:
        rows = sync_slurm(study, resume_cancelled=first)
        first = False
        table = status_table(rows)
        key = [(r["cell"].name, r["job"], r["state"], last_metrics(r["cell"]).get("step")) for r in rows]
        if key != shown:
            print(f"== {time.strftime('%H:%M:%S')}\n{table}", flush=True)
            shown = key
        if study_ended(rows):
            return rows
        time.sleep(poll)


def failed_logs(study: Study, rows: list[dict]) -> list[Path]:
    return [study.log_file(r["cell"]) for r in rows if r["state"] == "failed"]
