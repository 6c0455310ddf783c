#!/usr/bin/env bash
# Run the kernel tests (Triton interpreter) and the sm_90 compile checks on each Triton version
# users get: 3.6.0 (torch 2.11's CUDA wheels), 3.7.1 (torch 2.13's) and the newest on PyPI.
# Each version is installed into its own folder under ${TRITON_MATRIX_DIR:-/tmp/qdcompile-triton}
# and put first on PYTHONPATH; the venv's own Triton is left alone. Triton 3.6's interpreter
# converts 1-element arrays to Python ints, which numpy >= 2.3 refuses, so that column runs with
# numpy < 2.3 (what torch 2.11 installs ship with); the compiled path is unaffected.
#   usage: bash tests/kernels/triton_versions.sh [VERSION ...]     (default: 3.6.0 3.7.1 newest)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=${TRITON_MATRIX_DIR:-/tmp/qdcompile-triton}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.6.0 3.7.1 newest)
status=0
for v in "${versions[@]}"; do
  dir="$root/$v"
  if [ ! -d "$dir/triton" ]; then
    spec=triton; [ "$v" = newest ] || spec="triton==$v"
    python -m pip install -q --no-deps --target "$dir" "$spec"
    case "$v" in 3.6.*) python -m pip install -q --no-deps --target "$dir" "numpy<2.3" ;; esac
  fi
  got=$(PYTHONPATH="$dir" python -c "import triton; print(triton.__version__)")
  echo "== Triton $got ($v)"
  if ! PYTHONPATH="$dir" python -m pytest -q -p no:cacheprovider tests/kernels; then
    echo "!! kernel tests failed on Triton $got"; status=1
  fi
done
exit $status
