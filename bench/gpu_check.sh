#!/usr/bin/env bash
# One-call GPU check on a fresh H100/H200 where only torch and Triton are installed:
#   bash bench/gpu_check.sh [bench/gpu_check.py options]      (≤ 8 minutes; --smoke on a CPU)
# Writes bench/results/gpu-check-<date>.json/.md (+ the kernel benchmark's kernels-*.json/.md).
# diffusers (for the U-Net stage) is installed from carried wheels when missing:
#   on a machine with internet: python -m pip download diffusers -d bench/wheels
#   (or point QDCOMPILE_WHEELS at the folder); without it the U-Net stages record the ImportError.
# qdcompile runs from this checkout; nothing else is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=${QDCOMPILE_WHEELS:-bench/wheels}
if ! python -c "import diffusers" >/dev/null 2>&1; then
  if compgen -G "$wheels/*.whl" >/dev/null; then
    python -m pip install -q --no-index --find-links "$wheels" diffusers || echo "!! diffusers install from $wheels failed"
  else
    echo "!! diffusers missing and no wheels in $wheels: the U-Net stages will record the ImportError"
  fi
fi
timeout -k 10 480 python bench/gpu_check.py "$@"
status=$?
[ $status -eq 124 ] && echo "!! gpu_check hit the 8-minute limit; the JSON/Markdown hold every finished stage"
exit $status
