#!/usr/bin/env bash
# GPU readiness: CUDA bf16 vs CPU fp32 equivalence, 7B-shaped batch-1 decode vs the bandwidth
# roofline, 64 concurrent requests over 32 adapters vs all-base with CUDA graphs on and off.
# Under 8 minutes on one CUDA GPU. On a CPU: scripts/gpu-check.sh --device cpu --tiny
# Options: see scripts/gpu_check.py (--device, --dtype, --tiny, --requests, --adapters, --new-tokens).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; fi
exec "$python" "$here/gpu_check.py" "$@"
