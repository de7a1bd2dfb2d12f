#!/usr/bin/env bash
# Submit launch/slurm/train.sbatch with its logs in one place:
#
#   launch/slurm/submit.sh [SBATCH OPTIONS --] CONFIG.yaml [section.key=value ...]
#   e.g. launch/slurm/submit.sh --nodes 4 --gpus-per-node 8 -p gpu -A myproject --time 24:00:00 -- configs/1b.yaml
#
# Creates the log root ($NORMTRON_LOGS, default the checkout's logs/, or ./logs when this script is the installed
# package's; sbatch does not create directories), writes the job's
# output to <log root>/<job name>-<job id>.out (per-node logs go to <log root>/<run name>/), and prints the job id.
# Environment knobs: see train.sbatch.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SBATCH_ARGS=()
if printf '%s\n' "$@" | grep -qx -- '--'; then
  while [ "$1" != "--" ]; do SBATCH_ARGS+=("$1"); shift; done
  shift
fi
[ $# -ge 1 ] || { echo "normtron: error: submit.sh: usage: submit.sh [SBATCH OPTIONS --] CONFIG.yaml [overrides]" >&2; exit 2; }
if [ -f "$REPO/pyproject.toml" ]; then DEFAULT_LOGS=$REPO/logs; else DEFAULT_LOGS=$PWD/logs; fi
LOGS=${NORMTRON_LOGS:-$DEFAULT_LOGS}
mkdir -p "$LOGS"
export NORMTRON_LAUNCH=$REPO/launch NORMTRON_LOGS=$LOGS
job=$(sbatch --parsable --output "$LOGS/%x-%j.out" "${SBATCH_ARGS[@]}" "$REPO/launch/slurm/train.sbatch" "$@")
job=${job%%;*}
echo "submitted job $job: output $LOGS/<job name>-$job.out, node logs under $LOGS/"
