"""scripts/gpu-check.sh runs end to end on a CPU with a tiny model (on CUDA it runs the 7B shape)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_script_runs_on_cpu_with_a_tiny_model():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--device", "cpu", "--tiny",
                          "--requests", "4", "--adapters", "2", "--new-tokens", "4"],
                         env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # float32 on both sides: the equivalence check demands identical tokens.
    assert any(line.startswith("[1]") and "8/8 requests" in line and line.endswith("PASS") for line in lines)
    assert any(line.startswith("[2] batch-1 decode") and "roofline" in line for line in lines)
    assert sum("CUDA graphs" in line and "adapters/base" in line for line in lines) == 2
    assert any(line.startswith("[4] host synchronisations per decode step") for line in lines)
