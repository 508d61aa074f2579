#!/usr/bin/env bash
# Launch the trainer (fla.train.train) under torchrun with flame's command line.
#
#   NNODE=1 NGPU=2 LOG_RANK=0 bash train.sh --job.config_file configs/fla.toml --job.dump_folder exp/... [flags]
#   bash train.sh            # no arguments: the embedded default, a tiny laLTE model on the shipped corpus and
#                            # tokenizer, offline, on CPU or GPU, in a couple of minutes
#
# Environment: NNODE (1), NGPU (processes per node; default: the number of CUDA GPUs, 1 without CUDA),
# LOG_RANK (local ranks whose output is shown, default 0), MASTER_ADDR (localhost), MASTER_PORT (0: pick a free
# port), PYTHON (the interpreter; default .venv/bin/python when present, else python3).
# Logs of every rank go to <dump_folder>/logs (torchrun --log-dir); rank LOG_RANK is also shown on the console.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [ -z "${PYTHON:-}" ]; then
  # first run on a fresh clone: set up .venv with the pinned stack (the README's main command does its own set-up)
  if [ ! -x .venv/bin/python ] && ! python3 -c 'import torch, triton, transformers, datasets, einops' 2>/dev/null; then
    echo "train.sh: creating .venv with requirements.txt and this package (first run only, a few minutes)" >&2
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements.txt
    .venv/bin/python -m pip install -q -e .
  fi
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ $# -eq 0 ]; then
  # Embedded default: a tiny laLTE (Gated DeltaNet + LTE attention, window 32, buffer 16 of 128 tokens) on the
  # shipped corpus and tokenizer; the L1 controller steers each head towards 16 kept tokens per sequence
  set -- --job.dump_folder exp/tiny-gdn-lte \
    --model.config configs/tiny_gdn_lte.json --model.tokenizer_path assets/tokenizer \
    --training.dataset assets/corpus --training.dataset_split train \
    --training.batch_size 8 --training.seq_len 128 --training.context_len 128 \
    --training.gradient_accumulation_steps 1 --training.steps 500 --training.max_norm 1.0 --training.skip_nan_inf \
    --training.num_workers 1 --training.seed 42 \
    --optimizer.name AdamW --optimizer.lr 3e-3 --optimizer.eps 1e-15 \
    --lr_scheduler.warmup_steps 50 --lr_scheduler.decay_type cosine --lr_scheduler.lr_min 0.1 \
    --checkpoint.enable_checkpoint --checkpoint.interval 100 --checkpoint.load_step -1 \
    --activation_checkpoint.mode none --metrics.log_freq 10
fi

# the dump folder, for the logs (last occurrence wins, as in the trainer; default as the trainer's)
dump=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --job.dump_folder=*) dump="${args[$i]#*=}" ;;
    --job.dump_folder) dump="${args[$((i + 1))]:-}" ;;
  esac
done
if [ -z "$dump" ]; then
  cfg_file=""
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
      --job.config_file=*) cfg_file="${args[$i]#*=}" ;;
      --job.config_file) cfg_file="${args[$((i + 1))]:-}" ;;
    esac
  done
  if [ -n "$cfg_file" ] && [ -f "$cfg_file" ]; then
    dump=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("job", {}).get("dump_folder", ""))' "$cfg_file")
  fi
fi
dump="${dump:-./torchtitan/outputs}"
mkdir -p "$dump/logs"

NNODE=${NNODE:-1}
if [ -z "${NGPU:-}" ]; then
  NGPU=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)
fi
LOG_RANK=${LOG_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-0}
if [ "$MASTER_PORT" = "0" ]; then
  MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi

echo "[train.sh] NNODE=$NNODE NGPU=$NGPU LOG_RANK=$LOG_RANK MASTER=$MASTER_ADDR:$MASTER_PORT dump=$dump"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODE" --nproc_per_node "$NGPU" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 --log-dir "$dump/logs" \
  -m fla.train.train "$@"
