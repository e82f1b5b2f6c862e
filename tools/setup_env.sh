#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv:
#   torch (kept if present) -> mmcv 2.1.0 built from source with its ops against that
#   torch -> mmengine / mmdet / pycocotools / ... -> mmdet_moe in editable mode, with
#   the extras 'tests' (pytest), 'tools' (what mmdet's analysis tools import),
#   'export' (onnx, onnxruntime: tools/export_onnx.py) and 'docs' (mkdocs: make docs).
# The versions are those of requirements/constraints.txt (pip -c): setup.py itself
# only asks for ranges. An installed torch is kept, and pinned as it is for the rest.
# Idempotent: every step checks what exists first. The mmcv wheel is cached outside the
# checkout, keyed by Python and torch version (and, for a CUDA build of torch, its CUDA
# version and the archs compiled for), because pip's own wheel cache does not know
# which torch a wheel was compiled against.
# A CUDA build of torch gets mmcv's CUDA ops (FORCE_CUDA=1, also where the build sees
# no GPU), which needs nvcc: tools/mmcv_build_plan.py decides, and stops with what to
# install when nvcc is missing (FORCE_CUDA=0 accepts mmcv without CUDA ops instead).
# TORCH_SPEC and TORCH_INDEX_URL choose the torch installed into a venv without one.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
CONSTRAINTS=$ROOT/requirements/constraints.txt
pinned() { sed -n "s/^$1==\([^ #]*\).*/\1/p" "$CONSTRAINTS" | head -n 1; }
[ -f "$CONSTRAINTS" ] || { echo "[setup] $CONSTRAINTS is missing" >&2; exit 1; }
TORCH_SPEC=${TORCH_SPEC:-torch==$(pinned torch)}
MMCV_VERSION=$(pinned mmcv)
CACHE=${MMDET_MOE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmdet-moe}
STEP=""

step() { STEP="$1"; echo "[setup] $1"; }
# the constraints with torch pinned to the installed one (made after the torch step)
PINS=$(mktemp)
trap 'status=$?; rm -f "$PINS"; [ $status -ne 0 ] && echo "[setup] FAILED at step: $STEP (exit $status)" >&2' EXIT

step "checking the Python interpreter ($PYTHON)"
command -v "$PYTHON" >/dev/null || { echo "[setup] $PYTHON not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "[setup] $PYTHON is not Python 3.11" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating the virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

step "build tools (setuptools >=77.0.3,<81: mmcv's setup.py imports pkg_resources)"
if ! "$PY" -c 'import setuptools, wheel, ninja; v = tuple(map(int, setuptools.__version__.split(".")[:2])); assert (77, 0) <= v < (81, 0)' 2>/dev/null; then
  "${PIP[@]}" install -q -c "$CONSTRAINTS" "setuptools>=77.0.3,<81" wheel ninja
fi

step "torch (kept if already installed, else $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL})"
if ! "$PY" -c 'import torch' 2>/dev/null; then
  # e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 for a CUDA build
  "${PIP[@]}" install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
TORCH_INFO=$("$PY" -c 'import sys, torch, importlib.metadata as m; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}", m.version("torch"))')
read -r TORCH_TAG TORCH_DIST <<<"$TORCH_INFO"
echo "[setup]   using $TORCH_TAG"
{ grep -v -i '^torch==' "$CONSTRAINTS"; echo "torch==$TORCH_DIST"; } >"$PINS"

step "mmcv $MMCV_VERSION with compiled ops"
# keep the installed mmcv, install the cached wheel or build one: decided by
# tools/mmcv_build_plan.py from torch (CUDA build or not), nvcc, FORCE_CUDA,
# TORCH_CUDA_ARCH_LIST, MAX_JOBS, the installed mmcv and the cache; it prints shell
# assignments (MMCV_ACTION, MMCV_WHEELS, MMCV_WHEEL, MMCV_BUILD_ENV, ...), or exits 2
# with what to install
PLAN=$("$PY" "$ROOT/tools/mmcv_build_plan.py" --mmcv-version "$MMCV_VERSION" --wheels "$CACHE/wheels")
eval "$PLAN"
if [ "$MMCV_ACTION" != keep ]; then
  WHEELS=$MMCV_WHEELS
  WHEEL=$MMCV_WHEEL
  if [ "$MMCV_ACTION" = build ]; then
    echo "[setup]   no cached wheel in $WHEELS: building from source ($MMCV_BUILD_TIME)"
    BUILD=$(mktemp -d)
    env "${MMCV_BUILD_ENV[@]}" \
      "${PIP[@]}" wheel --no-deps --no-build-isolation --no-cache-dir -w "$BUILD" "mmcv==$MMCV_VERSION"
    mkdir -p "$WHEELS"
    mv "$BUILD"/mmcv-*.whl "$WHEELS"/   # only a finished wheel ever lands in the cache
    rm -rf "$BUILD"
    WHEEL=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
  fi
  "${PIP[@]}" install -q -c "$PINS" ${MMCV_PIP_FLAGS[@]+"${MMCV_PIP_FLAGS[@]}"} "$WHEEL"
fi

step "mmengine, mmdet, pycocotools and mmdet_moe (editable, with the tests, tools, export and docs extras)"
# re-installed when setup.py or the constraints changed since, or when the checkout
# lacks mmdet_moe/.mim (the editable install's link to configs/, git-ignored)
if ! "$PY" -c 'import mmdet_moe, mmdet, pytest, entmax, seaborn, psutil, sklearn, onnx, onnxruntime, mkdocs' 2>/dev/null \
   || [ "$ROOT/setup.py" -nt "$VENV/.mmdet_moe-installed" ] \
   || [ "$CONSTRAINTS" -nt "$VENV/.mmdet_moe-installed" ] \
   || [ ! -f "$ROOT/mmdet_moe/.mim/model-index.yml" ] || [ ! -d "$ROOT/mmdet_moe/.mim/configs" ]; then
  "${PIP[@]}" install -q -c "$PINS" -e "$ROOT[tests,tools,export,docs]"
  touch "$VENV/.mmdet_moe-installed"
fi

step "checking the stack"
"$PY" - <<'PY'
import torch, mmcv, mmengine, mmdet, mmcv.ops  # noqa: F401
import os.path as osp
import mmdet_moe
configs = osp.join(osp.dirname(mmdet_moe.__file__), '.mim', 'configs')
assert osp.isdir(configs), f'{configs} is missing (mmdet_moe:: configs)'
print(f'[setup]   torch {torch.__version__}, mmcv {mmcv.__version__}, '
      f'mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, '
      f'mmdet_moe {mmdet_moe.__version__}')
if torch.version.cuda is not None:
    from mmcv.ops import get_compiling_cuda_version
    print(f"[setup]   CUDA: torch {torch.version.cuda}, mmcv's ops "
          f'{get_compiling_cuda_version()}, GPUs visible: {torch.cuda.device_count()}')
PY
STEP=""
echo "[setup] done: $VENV"
