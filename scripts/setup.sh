#!/usr/bin/env bash
# Set up .venv/ at the repo root (idempotent and fast on re-run) and the embedded default model.
#   scripts/setup.sh          runtime install
#   scripts/setup.sh --dev    + test/benchmark dependencies (transformers, peft, real clients)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
py="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
stamp=".venv/.installed${extra:+-dev}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    # Pinned CPU torch first, so nothing below pulls a multi-GB CUDA build.
    .venv/bin/pip install --disable-pip-version-check -q "torch==2.13.0"
    .venv/bin/pip install --disable-pip-version-check -q -e ".${extra}"
    echo "$want" > "$stamp"
fi
.venv/bin/adapter-server fetch-default
# The fused CPU kernels of the bf16/int8/int4 formats, compiled once here rather than at the
# first serve (about 30 s; without a C++ compiler the formats run on plain torch ops).
.venv/bin/python -c "from model import native_ops; native_ops.load()"
