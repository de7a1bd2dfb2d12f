"""`normtron study STUDY.yaml [--watch | --status | --cancel | --report-only]`.

local / torchrun: train the cells here (blocking), then write the report. slurm: check the study against the
cluster, print the cost, submit what is not yet submitted, print the status table and return (--watch: keep
polling until every cell has ended); the report is written once every cell has ended, and by --report-only any time.
"""

from __future__ import annotations

from normtron.trainer.errors import UserError
from normtron.trainer.study import tracking
from normtron.trainer.study.cost import cost_summary
from normtron.trainer.study.launchers import check_slurm, require_slurm
from normtron.trainer.study.report import write_report
from normtron.trainer.study.spec import Study, load_study


def _failed(study: Study, rows: list[dict]) -> None:
    logs = tracking.failed_logs(study, rows)
    if logs:
        raise UserError(f"{len(logs)} of {len(study.cells)} runs failed after {study.retries + 1} attempt(s); their "
                        f"logs: {', '.join(map(str, logs))} (delete status/<cell>.json and re-run to try again)")


def study_command(path: str, max_parallel: int | None = None, report_only: bool = False, status: bool = False,
                  watch: bool = False, cancel: bool = False, cost: bool = False, poll: float = 30.0) -> None:
    study = load_study(path, max_parallel, check_data=not cost)
    if cost:
        print(cost_summary(study) or f"{study.path}: no cell asks for GPUs (resources.gpus_per_node with launcher: "
                                     f"slurm), so there is no GPU cost to estimate")
        return
    slurm = study.launcher == "slurm"
    if report_only:
        print(f"report: {write_report(study) / 'report.md'}")
        return
    if (cancel or watch) and not slurm:
        raise UserError(f"--{'cancel' if cancel else 'watch'} is for launcher: slurm; a {study.launcher} study runs "
                        f"in the foreground (stop it with Ctrl-C, re-run to resume)")
    if slurm:
        require_slurm()
    if status:
        print(tracking.status_table(tracking.sync_slurm(study, submit=False) if slurm else tracking.local_rows(study)))
        if bill := cost_summary(study):
            print(bill)
        return
    if cancel:
        print(f"cancelled {tracking.cancel_slurm(study)} job(s) of {study.path}; re-run the study to resubmit them")
        return
    if not slurm:
        failed = tracking.run_processes(study)
        print(f"report: {write_report(study) / 'report.md'}")
        if failed:
            raise UserError(f"{failed} of {len(study.cells)} runs failed (their logs are in "
                            f"{study.output_dir / 'logs'}); re-run the study to retry them")
        return
    check_slurm(study)
    if bill := cost_summary(study):
        print(bill, flush=True)
    if watch:
        rows = tracking.watch_slurm(study, poll)
    else:
        rows = tracking.sync_slurm(study, resume_cancelled=True)
        print(tracking.status_table(rows))
    if tracking.study_ended(rows):
        print(f"report: {write_report(study) / 'report.md'}")
        _failed(study, rows)
    else:
        print(f"follow with: normtron study {study.path} --status (or --watch); report any time: --report-only")
