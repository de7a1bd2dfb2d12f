"""`normtron study`: a grid of training runs, launched, tracked and reported.

spec.py       the study file: grid, overrides, launcher, per-cell resources, published numbers
launchers.py  how a cell starts: a local process, launch/torchrun.sh, or a Slurm job (train.sbatch)
tracking.py   where each cell stands (status/), the local run loop, the Slurm submit/poll/resubmit pass
cost.py       what the study will cost in GPU-hours, printed before anything is queued
report.py     report.md, CSVs and plots, from what the runs wrote
command.py    the subcommand: submit, --watch, --status, --cancel, --report-only
"""
