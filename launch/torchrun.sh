#!/usr/bin/env bash
# Launch `normtron train` under torchrun on this node: one node, or one node of a multi-node job (c10d rendezvous).
#
#   launch/torchrun.sh [LAUNCH OPTIONS] CONFIG.yaml [section.key=value ...]
#
#   --nproc-per-node N      processes on this node (default: the visible GPUs; without GPUs $NPROC or 2)
#   --nnodes N              nodes in the job (default 1: --standalone, no rendezvous endpoint needed)
#   --rdzv-endpoint H:P     with --nnodes > 1: host:port of the c10d rendezvous, the same on every node
#   --rdzv-id ID            with --nnodes > 1: a job id shared by the nodes (default normtron)
#   --local-addr ADDR       this node's address for the rendezvous (default: its fully qualified host name)
#   --log-dir DIR           this node's log is DIR/node<N>.log (default logs; N = $SLURM_NODEID, $NODE_RANK, or
#                           0 on a single node, the host name on several)
#   --max-restarts N        when a worker dies (OOM killer, hardware fault), torchrun restarts all workers in place
#                           up to N times; they resume from the newest complete checkpoint (default
#                           $NORMTRON_MAX_RESTARTS, else 3; 0 = the first failure ends the job)
#
# Environment it sets where unset: OMP_NUM_THREADS (cores / processes), PYTHONUNBUFFERED=1, and on CUDA machines
# NCCL_DEBUG=WARN, TORCH_NCCL_ASYNC_ERROR_HANDLING=1. NORMTRON_PYTHON picks the interpreter (default .venv/bin/python
# of this checkout, else python3).
#
# Preemption: SIGUSR1 or SIGTERM to this script (or to the workers) makes the trainer checkpoint after its current
# step and exit; the script then exits with 75 (EX_TEMPFAIL), which launch/slurm/train.sbatch turns into a requeue.
# Workers die with their agent (trainer/supervision.py): SIGKILL to the agent leaves no worker behind.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXIT_REQUEUE=75  # trainer/preemption.py EXIT_REQUEUE

die() { echo "normtron: error: launch/torchrun.sh: $*" >&2; exit 2; }

NNODES=1 NPROC_PER_NODE="" RDZV_ENDPOINT="" RDZV_ID=normtron LOCAL_ADDR="" LOG_DIR=logs
MAX_RESTARTS=${NORMTRON_MAX_RESTARTS:-3}
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node) NPROC_PER_NODE=${2:?}; shift 2 ;;
    --nnodes) NNODES=${2:?}; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) RDZV_ENDPOINT=${2:?}; shift 2 ;;
    --rdzv-id|--rdzv_id) RDZV_ID=${2:?}; shift 2 ;;
    --local-addr|--local_addr) LOCAL_ADDR=${2:?}; shift 2 ;;
    --log-dir|--log_dir) LOG_DIR=${2:?}; shift 2 ;;
    --max-restarts|--max_restarts) MAX_RESTARTS=${2:?}; shift 2 ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    -h|--help) sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --*) die "unknown option $1 (launch options come before CONFIG.yaml; see --help)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "no config given; usage: launch/torchrun.sh [options] CONFIG.yaml [section.key=value ...]"

if [ -n "${NORMTRON_PYTHON:-}" ]; then PYTHON=$NORMTRON_PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python
else PYTHON=python3; fi

# Visible GPUs: Slurm and users restrict them with CUDA_VISIBLE_DEVICES; otherwise all that nvidia-smi lists.
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  GPUS=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c '^[0-9A-Za-z]')
elif command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
else
  GPUS=0
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo "${NPROC:-2}")}
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive whole number, not $NPROC_PER_NODE"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive whole number, not $NNODES"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts (or \$NORMTRON_MAX_RESTARTS) must be a whole number >= 0, not $MAX_RESTARTS"
if [ "$NNODES" -gt 1 ]; then
  [[ "$RDZV_ENDPOINT" =~ ^[^:]+:[0-9]+$ ]] || die "--nnodes $NNODES needs --rdzv-endpoint HOST:PORT, got '$RDZV_ENDPOINT'"
  RDZV=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
else
  RDZV=(--standalone)
fi
[ -n "$LOCAL_ADDR" ] && RDZV+=(--local-addr "$LOCAL_ADDR")

# Each process gets its share of the cores (torchrun alone would force 1 thread each, with a warning).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
export PYTHONUNBUFFERED=1
if [ "$GPUS" -gt 0 ]; then
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                                           # errors and warnings only
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}   # a failed collective ends the job
fi

NODE=${SLURM_NODEID:-${NODE_RANK:-}}
[ -n "$NODE" ] || NODE=$([ "$NNODES" = 1 ] && echo 0 || hostname -s)
mkdir -p "$LOG_DIR" || die "cannot create --log-dir $LOG_DIR"
LOG=$LOG_DIR/node$NODE.log
# The log copy must outlive a stop signal, or the workers would write into a closed pipe while they checkpoint.
exec > >(trap '' USR1 TERM INT; exec tee -a "$LOG") 2>&1
echo "== $(date -u +%FT%TZ) $(hostname) node $NODE/$NNODES: $NPROC_PER_NODE process(es), ${GPUS} GPU(s)," \
     "OMP_NUM_THREADS=$OMP_NUM_THREADS, ${RDZV[*]}, max restarts $MAX_RESTARTS"

# A stop signal before training starts: nothing to save, so stop here and ask for the requeue.
STOPPED=""
trap 'STOPPED=USR1' USR1
trap 'STOPPED=TERM' TERM
# A bad config fails here with one line, not inside torchrun's report of failed workers.
"$PYTHON" -m normtron train --check --world-size $((NNODES * NPROC_PER_NODE)) "$@"; rc=$?
if [ -n "$STOPPED" ]; then echo "torchrun.sh: $STOPPED received before training started"; exit $EXIT_REQUEUE; fi
[ "$rc" -eq 0 ] || exit "$rc"

MARKER=$(mktemp "${TMPDIR:-/tmp}/normtron-preempted.XXXXXX") && rm -f "$MARKER"
export NORMTRON_PREEMPTED_FILE=$MARKER  # trainer/preemption.py leaves it when it stops for a requeue
# torchrun's agent ignores USR1 (else the signal would kill it mid-checkpoint); the workers install their own handler.
# The agent is this subshell exec'ed, so its pid is $BASHPID: the workers check that it is their parent.
( trap '' USR1; export NORMTRON_AGENT_PID=$BASHPID
  exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC_PER_NODE" \
    --max-restarts "$MAX_RESTARTS" -m normtron train "$@" ) &
AGENT=$!
# A stop signal sent to this script alone is passed on to the workers (the agent's children).
forward() { echo "torchrun.sh: $1 received: the workers checkpoint after their current step";
            pkill "-$1" -P "$AGENT" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while true; do
  wait "$AGENT"; rc=$?
  kill -0 "$AGENT" 2>/dev/null || break  # `wait` also returns when a trapped signal arrives
done
# Stopped workers exit 0 after leaving the marker (an error exit would make torchrun restart them): requeue.
if [ -e "$MARKER" ]; then rc=$EXIT_REQUEUE; fi
rm -f "$MARKER"
echo "== $(date -u +%FT%TZ) node $NODE: exit code $rc$([ "$rc" = "$EXIT_REQUEUE" ] && echo ' (preempted: requeue to resume)')"
exit "$rc"
