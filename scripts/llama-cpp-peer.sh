#!/usr/bin/env bash
# llama.cpp for the batch-1 peer of `adapter-server bench` (row (e), `--only modes`): builds
# llama-cpp-python from source (PyPI has no wheel of it) into a folder of its own, to be named on
# PYTHONPATH. Only the library is built (no tests, examples, server or tools): ~5 minutes on the
# 2-core sandbox, against ~45 with every target.
#   usage: scripts/llama-cpp-peer.sh [DIR]   (default /work/peers/llamacpp)
#   then:  PYTHONPATH=DIR adapter-server bench ...
set -euo pipefail
dir="${1:-/work/peers/llamacpp}"
pip="$(dirname "$0")/../.venv/bin/pip"
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$pip" install -q --no-deps --target "$dir" "llama-cpp-python==0.3.36" diskcache
PYTHONPATH="$dir" "$(dirname "$0")/../.venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready: PYTHONPATH=$dir')"
