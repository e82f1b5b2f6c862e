#!/usr/bin/env bash
# The GPU path in one command:
#   bash tools/gpu_check.sh [--dry-run]
# 1. setup: a virtual environment with a CUDA build of torch and mmcv's CUDA ops
#    (tools/setup_env.sh with VENV, TORCH_INDEX_URL and FORCE_CUDA=1; the CPU venv
#    .venv stays as it is; mmcv is built once, then taken from the wheel cache);
# 2. card: the GPU as nvidia-smi names it, and torch in that venv seeing it;
# 3. pytest -m cuda: the tests marked cuda (tests/test_cuda: MoE layers on CUDA
#    against the CPU, fp16 and bf16 autocast training steps of every toy MoE config,
#    export on CUDA, no host synchronisation);
# 4. tools/benchmark.py sweep --device cuda;
# 5. tools/demo.py (its defaults: the embedded toy demo, trained on the GPU).
# Each step's output goes to the terminal and to work_dirs/gpu_check/<step>.log; a
# summary table follows (step, status, seconds, key figure). Exit status 1 if a step
# failed, 0 otherwise. Without a GPU (no nvidia-smi listing one, and no torch here that
# sees one) it prints that it skipped and exits 0. --dry-run prints the steps' commands
# and runs nothing.
# Environment: VENV (default .venv-cuda), TORCH_INDEX_URL (default the cu128 wheels of
# download.pytorch.org), GPU_CHECK_DIR (default work_dirs/gpu_check); setup_env.sh's
# own variables (MAX_JOBS, TORCH_CUDA_ARCH_LIST, CUDA_HOME, ...) pass through.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv-cuda}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
OUT=${GPU_CHECK_DIR:-$ROOT/work_dirs/gpu_check}
PY=$VENV/bin/python

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "[gpu_check] unknown argument '$arg'; usage: bash tools/gpu_check.sh [--dry-run]" >&2
       exit 2 ;;
  esac
done

# A GPU is there when nvidia-smi lists one, or when a torch already installed here
# (the CUDA venv, or the project's .venv) sees one (e.g. a container without nvidia-smi).
gpu_found() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    return 0
  fi
  local py
  for py in "$PY" "$ROOT/.venv/bin/python"; do
    if [ -x "$py" ] && "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
         2>/dev/null; then
      return 0
    fi
  done
  return 1
}

if ! gpu_found; then
  echo "[gpu_check] no CUDA GPU found: skipped"
  exit 0
fi

# the steps, in order; step_<name> runs one (from the repository root), DESCRIBE says what
STEPS=(setup card pytest sweep demo)
declare -A DESCRIBE=(
  [setup]="VENV=$VENV TORCH_INDEX_URL=$TORCH_INDEX_URL FORCE_CUDA=1 bash tools/setup_env.sh"
  [card]="nvidia-smi --query-gpu=name,memory.total --format=csv; torch in $VENV sees the GPU"
  [pytest]="$PY -m pytest -m cuda -q -rs tests"
  [sweep]="$PY tools/benchmark.py sweep --device cuda"
  [demo]="$PY tools/demo.py --work-dir $OUT/demo"
)
step_setup() {
  VENV=$VENV TORCH_INDEX_URL=$TORCH_INDEX_URL FORCE_CUDA=1 bash tools/setup_env.sh
}
step_card() {
  nvidia-smi --query-gpu=name,memory.total --format=csv || true  # absent in some containers
  # torch must see the GPU, or the cuda tests would only skip
  "$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), (
    f'torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU')
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'on', torch.cuda.get_device_name())
PY
}
step_pytest() { "$PY" -m pytest -m cuda -q -rs tests; }
step_sweep() { "$PY" tools/benchmark.py sweep --device cuda; }
step_demo() { "$PY" tools/demo.py --work-dir "$OUT/demo"; }

# The key figure of a finished step, read from its log.
key_figure() {
  local log=$1
  case $2 in
    setup) grep -m1 -e 'GPUs visible' -e 'FAILED at step' "$log" | sed 's/^\[setup\] *//' ;;
    card) grep -m1 '^torch .* on ' "$log" ;;
    pytest) grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -n 1 | tr -d '=' \
              | sed 's/^ *//; s/ *$//' ;;
    # the fused MoEConv2d's time at the largest N over the smallest (ideally ≈ 1)
    sweep) awk -F'|' '
      /^[|] variant/ && !c { for (i = 1; i <= NF; i++) if ($i ~ / \/ N=/) { c = i; h = $i } }
      c && /^[|] fused / { gsub(/ /, "", $c); gsub(/^ +| +$/, "", h)
                           print "fused MoEConv2d, " h ": " $c "x"; exit }' "$log" ;;
    demo) { grep -m1 'COCO bbox (toy val)' "$log" | sed 's/.*(toy val) //' | cut -d, -f1-2
            # mmengine's Runner logs its environment and puts the model on CUDA if it can
            grep -q 'CUDA available: True' "$log" \
              && echo '(trained on CUDA)' || echo '(the runner saw no CUDA)'
          } | paste -sd' ' ;;
  esac
}

if [ "$DRY_RUN" = 1 ]; then
  echo "[gpu_check] GPU found; dry run, the steps it would run (from $ROOT):"
  for name in "${STEPS[@]}"; do
    printf '  %-8s %s\n' "$name" "${DESCRIBE[$name]}"
  done
  echo "[gpu_check] logs would go to $OUT/<step>.log"
  exit 0
fi

cd "$ROOT"
mkdir -p "$OUT"
declare -A STATUS SECONDS_TAKEN KEY
FAILED=0
for name in "${STEPS[@]}"; do
  if [ "$name" != setup ] && [ "${STATUS[setup]}" != ok ]; then
    STATUS[$name]="not run"; SECONDS_TAKEN[$name]=0; KEY[$name]="the setup failed"
    continue
  fi
  log=$OUT/$name.log
  echo "==> [gpu_check] $name: ${DESCRIBE[$name]}"
  start=$(date +%s)
  set +e
  "step_$name" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  SECONDS_TAKEN[$name]=$(( $(date +%s) - start ))
  if [ "$rc" = 0 ]; then STATUS[$name]=ok; else STATUS[$name]="FAILED ($rc)"; FAILED=1; fi
  KEY[$name]=$(key_figure "$log" "$name" || true)
  [ "$rc" = 0 ] || KEY[$name]="${KEY[$name]:+${KEY[$name]}; }see $log"
done

echo
echo "[gpu_check] summary"
printf '%-8s %-12s %8s  %s\n' step status seconds 'key figure'
for name in "${STEPS[@]}"; do
  printf '%-8s %-12s %8s  %s\n' "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]}" \
    "${KEY[$name]}"
done
exit "$FAILED"
