#!/usr/bin/env bash
# Build the whole extension (CPU and CUDA kernels, sm_80 and sm_90) against the GPU image's
# torch (2.11.0, CUDA 13.0) with this machine's nvcc, then run the CPU tests against that
# build: what a GPU machine will compile, checked where there is no GPU (`make
# cuda-build-check`; not part of CI).
#
# The torch 2.11 environment pins triton 3.6, so the Triton kernels' tests run under its
# interpreter too. The first run downloads torch 2.11.0 and the CUDA libraries it loads (about
# 2.6 GB) into a
# virtual environment under $SAEP_CUDA_CHECK_CACHE (default ~/.cache/saep-kernels); later runs
# reuse it. The build happens in a copy of the working tree, so the checkout's own build is
# left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
CACHE=${SAEP_CUDA_CHECK_CACHE:-$HOME/.cache/saep-kernels}/torch-$TORCH_VERSION
VENV=$CACHE/venv
PY=$VENV/bin/python
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
command -v "$CUDA_HOME/bin/nvcc" >/dev/null || { echo "nvcc not found in $CUDA_HOME/bin"; exit 2; }

if [ ! -x "$PY" ] || ! "$PY" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION')" 2>/dev/null; then
  echo "== creating $VENV with torch $TORCH_VERSION (CUDA build; downloads once)"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" "setuptools>=64" wheel ninja
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$CUDA_HOME/bin/nvcc" --version | tail -1
ls "$CUDA_HOME/include" | grep -qi cusparse && echo "note: this toolkit has cuSPARSE headers" \
  || echo "toolkit without cuSPARSE headers (nvcc, cudart): as the build must need no more"

SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | tar -c --null -T - | tar -x -C "$SRC"
cd "$SRC"
echo "== building in $SRC (sm_80, sm_90)"
SAEP_FORCE_CUDA=1 SAEP_REQUIRE_EXTENSION=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,bench,transformers]"
"$PY" - <<'EOF'
import saep_kernels, saep_kernels._C as C
assert C.HAS_CPU and C.HAS_CUDA, "the extension was built without its CUDA kernels"
import torch
ops = ["fused_aggregate_fwd", "fused_aggregate_bwd", "fused_aggregate_varlen_fwd",
       "fused_aggregate_varlen_bwd"]
for op in ops:
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"saep_C::{op}", key), (op, key)
print("built:", C.__file__, "with CUDA kernels; ops with CPU and CUDA kernels:", ops)
EOF
echo "== CPU tests against this build"
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
echo "== ok: the extension builds against torch $TORCH_VERSION with CUDA, and its CPU tests pass"
