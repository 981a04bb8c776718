#!/usr/bin/env bash
# The GPU check for a session lent a CUDA device: NCCL torchrun with evaluation, save and exact
# resume (bitwise), bf16 + torch.compile, and the CUDA paths of generate, evaluate and export.
# About 3-5 minutes on one H100 (most of it torch.compile and process start-up), capped at 8.
# Exit 0: all passed; anything else: a line starting FAIL says what did not match.
#     bash bench/gpu_check.sh             # on the device
#     bash bench/gpu_check.sh --cpu       # the same steps on the CPU, to test the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec timeout 480 "$PY" bench/gpu_check.py "$@"
