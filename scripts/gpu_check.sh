#!/usr/bin/env bash
# GPU-machine checks and benchmarks, each stage under its own time limit, every log kept in OUT.
#
#   OUT=dir bash scripts/gpu_check.sh STAGE[:SECONDS] [STAGE[:SECONDS] ...]
#
# Stages (default limits in seconds):
#   tests-gdn (240)  tests-nsa (150)  tests-lte (120)  tests-attn (120)  tests-modules (120)  tests-graph (120):
#     the `gpu`-marked tests of one family (tests-graph: CUDA-graph decoding, tests/models/test_graph_decode.py)
#   tests-models (240): layer and model tests on CUDA with the default backends
#   tests-models-triton (240): the same with FLA_BACKEND=triton (every Triton path, opt-in ones included)
#   bench-ops (300): python -m benchmarks.ops (fla-core beside ours when .anchor/ holds it)
#   bench-gen (400): python -m benchmarks.generation --cuda-graph, one process per model (merged at the end)
#   bench-train (300): python -m benchmarks.training at seq 4096 and 16384
#   tune-attn (300): python -m benchmarks.ops.tune_attn, the tile / warp / stage sweep of the attention and LTE kernels
#   profile-ops (120): python -m benchmarks.ops.profile_ops, per-kernel CUDA times of NSA prefill / decode, LTE decode
#   tune-nsa (120): python -m benchmarks.ops.tune_nsa, the launch-setting sweep of NSA's selected-attention kernels
#   train-1gpu / train-2gpu (240): the paper's command line on the 0.4B laLTE config, shipped corpus, 30 steps
# A stage that fails or runs out of time is reported in OUT/summary.txt; the next one still runs.
# Environment: OUT (required), PYTHON (default python3), PYTEST_WORKERS (xdist workers for tests, default 4),
# OPS_ONLY (bench-ops suites, default lte,attn,nsa,gdn), GEN_MODELS (bench-gen models, default all),
# GEN_CONTEXTS (bench-gen context lengths, default the benchmark's),
# TRAIN_SEQ_LENS (bench-train, default 4096,16384), TRAIN_PROFILE (non-empty: bench-train writes kernel profiles).
# PROFILE_CASES (profile-ops cases, default nsa,nsa-decode,lte-decode).
# Use CUDA_VISIBLE_DEVICES to put two lanes of stages on two GPUs of one machine. Stages write many files (plots,
# per-model folders): pack OUT into one archive before handing it back from a lent machine.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OUT:?set OUT to the folder for logs and results}"
PY=${PYTHON:-python3}
workers=${PYTEST_WORKERS:-4}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

pytest_opts=()  # xdist workers and a per-test time limit, where installed
if "$PY" -c 'import xdist' 2>/dev/null && [ "$workers" -gt 1 ]; then pytest_opts=(-n "$workers"); fi
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then pytest_opts+=(--timeout 200); fi

pytest_stage() {  # $1 = limit, then pytest arguments (each test also limited by pytest-timeout)
  local limit=$1
  shift
  timeout -k 10 "$limit" "$PY" -m pytest -v -p no:cacheprovider "${pytest_opts[@]}" "$@"
}

train_stage() {  # $1 = limit, $2 = number of GPUs: the paper's command, local data, 30 steps, a checkpoint at 20
  local limit=$1 n=$2 dump=/tmp/exp-lte-0.4B-${2}gpu rc
  rm -rf "$dump"
  FLA_BACKEND=triton NNODE=1 NGPU=$n LOG_RANK=0 PYTHON=$PY timeout -k 10 "$limit" bash train.sh \
    --job.config_file configs/fla.toml --job.dump_folder "$dump" --model.config configs/gated_delta_net_lte_0.4B.json \
    --model.tokenizer_path assets/tokenizer --optimizer.name AdamW --optimizer.lr 3e-4 \
    --lr_scheduler.warmup_steps 8 --lr_scheduler.lr_min 0.1 --lr_scheduler.decay_type cosine \
    --training.data_parallel_shard_degree "$n" --training.data_parallel_replicate_degree 1 \
    --training.batch_size 4 --training.seq_len 4096 --training.gradient_accumulation_steps 2 --training.steps 30 \
    --training.max_norm 1.0 --training.skip_nan_inf --training.dataset assets/corpus --training.dataset_split train \
    --training.num_workers 2 --training.prefetch_factor 2 --training.seed 42 --checkpoint.interval 20 \
    --checkpoint.load_step -1 --metrics.log_freq 2 --metrics.enable_wandb false --profiling.profile_freq 5120
  rc=$?
  cp -r "$dump/logs" "$OUT/train-${n}gpu-logs" 2>/dev/null
  ls -R "$dump/checkpoint" > "$OUT/train-${n}gpu-checkpoints.txt" 2>/dev/null
  return $rc
}

run_stage() {  # $1 = name, $2 = limit
  local name=$1 limit=$2 start rc
  start=$(date +%s)
  echo "=== $name (limit ${limit}s) ==="
  case $name in
    tests-gdn) pytest_stage "$limit" tests/ops/gated_delta_rule -m gpu ;;
    tests-nsa) pytest_stage "$limit" tests/ops/nsa -m gpu ;;
    tests-lte) pytest_stage "$limit" tests/ops/lte -m gpu ;;
    tests-attn) pytest_stage "$limit" tests/ops/attn -m gpu ;;
    tests-modules) pytest_stage "$limit" tests/modules -m gpu ;;
    tests-graph) pytest_stage "$limit" tests/models/test_graph_decode.py -m gpu ;;
    tests-models) pytest_stage "$limit" tests/layers tests/models ;;
    tests-models-triton) FLA_BACKEND=triton pytest_stage "$limit" tests/layers tests/models ;;
    bench-ops)
      local anchor=()
      [ -d .anchor/fla ] && anchor=(--anchor-path .anchor)
      timeout -k 10 "$limit" "$PY" -m benchmarks.ops --only "${OPS_ONLY:-lte,attn,nsa,gdn}" --out "$OUT/ops" "${anchor[@]}" ;;
    bench-gen)
      local deadline=$(( $(date +%s) + limit )) dirs=() m left
      for m in ${GEN_MODELS:-$("$PY" -c 'from benchmarks.generation import MODELS; print(" ".join(MODELS))')}; do
        left=$(( deadline - $(date +%s) ))
        if [ "$left" -le 10 ]; then echo "bench-gen: no time left for $m"; break; fi
        timeout -k 10 "$left" "$PY" -m benchmarks.generation --models "$m" --cuda-graph --out "$OUT/gen-$m" \
          ${GEN_CONTEXTS:+--contexts "$GEN_CONTEXTS"} && dirs+=("$OUT/gen-$m")
      done
      [ ${#dirs[@]} -gt 0 ] && "$PY" -m benchmarks.generation --merge "${dirs[@]}" --out "$OUT/generation" ;;
    bench-train) timeout -k 10 "$limit" "$PY" -m benchmarks.training --seq-lens "${TRAIN_SEQ_LENS:-4096,16384}" \
      ${TRAIN_PROFILE:+--profile} \
      --out "$OUT/training" ;;
    tune-attn) timeout -k 10 "$limit" "$PY" -m benchmarks.ops.tune_attn --out "$OUT/tune" ;;
    profile-ops) timeout -k 10 "$limit" "$PY" -m benchmarks.ops.profile_ops ${PROFILE_CASES:+--cases "$PROFILE_CASES"} ;;
    tune-nsa) timeout -k 10 "$limit" "$PY" -m benchmarks.ops.tune_nsa ;;
    train-1gpu) train_stage "$limit" 1 ;;
    train-2gpu) train_stage "$limit" 2 ;;
    *) echo "unknown stage $name"; return 2 ;;
  esac
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
}

for spec in "$@"; do
  name=${spec%%:*}
  limit=${spec#*:}
  if [ "$limit" = "$spec" ]; then
    case $name in
      tests-gdn|tests-models|tests-models-triton|train-1gpu|train-2gpu) limit=240 ;;
      tests-nsa) limit=150 ;;
      bench-ops|bench-train) limit=300 ;;
      bench-gen) limit=400 ;;
      *) limit=120 ;;
    esac
  fi
  run_stage "$name" "$limit" > "$OUT/$name.log" 2>&1
  tail -n 3 "$OUT/$name.log"
done
