"""The fused CPU kernels of model/csrc/decode_ops.cpp, compiled once per machine on first use.

Why: in the packed weight modes a batch-1 decode step of the default model spent about as long
in ~20 small kernels per layer (RMSNorm's seven, RoPE's four, casts, two KV writes, SDPA on a
single query) as in its matmuls. The fused kernels here do the same arithmetic in one pass
each: RMSNorm, silu(gate)·up, RoPE + KV append + attention over a decode row, and
LLaMA-Adapter's gated branch.

The build (torch.utils.cpp_extension, about 30 s on 2 cores) goes to the cache directory, keyed
by the source, the torch version and the CPU's instruction set (it is compiled for this CPU), so
a container image moved to another machine builds its own copy instead of faulting. Without a
C++ compiler, or with ADAPTER_SERVER_NATIVE_OPS=0, `load()` returns None and the model runs the
same steps as plain torch ops.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_ops.cpp"
DISABLE_ENV = "ADAPTER_SERVER_NATIVE_OPS"
NAME = "adapter_server_decode_ops"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: code built with -march=native runs only where they match."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def build_dir() -> Path:
    """Where this machine's build lives: the cache, or a temporary directory where the cache is
    read-only and holds no build for this CPU (a container image run on another machine)."""
    from .default_model import cache_root  # noqa: PLC0415

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_signature().encode())
    cached = cache_root() / "native-ops" / key.hexdigest()[:16]
    try:
        cached.mkdir(parents=True, exist_ok=True)
        if (cached / f"{NAME}.so").is_file() or os.access(cached, os.W_OK):
            return cached
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"llama-adapter-server-native-ops-{os.getuid()}" / cached.name


@cache
def load() -> ModuleType | None:
    """The compiled kernels (built here the first time), or None where they cannot be had."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        target = build_dir()
        built = target / f"{NAME}.so"
        if built.is_file():     # the key names the source: a build there is current
            return _import(built)
        from torch.utils import cpp_extension  # noqa: PLC0415

        target.mkdir(parents=True, exist_ok=True)
        log.info("building the fused CPU kernels into %s (once per machine, ~30 s)", target)
        return cpp_extension.load(NAME, [str(SOURCE)], build_directory=str(target),
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, nowhere to build: plain torch ops instead
        log.warning("fused CPU kernels unavailable (%s: %s); running plain torch ops",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
