"""benchmarks/gpu_check.sh (issue 17): on a machine without CUDA it checks the CPU fallback end to
end (shipped 2D and 3D models, OOM recovery simulated) and exits 0 with a table."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.realdata
def test_gpu_check_quick_runs_the_fallback_and_passes() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/gpu_check.sh in full instead")
    env = {**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python")} if (ROOT / ".venv").exists() else None
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| cpu |")]
    assert any("CPU fallback" in r for r in rows)
    assert any("OOM-adaptive (simulated" in r and "PASS" in r for r in rows)
    assert any(r.startswith("| cpu | mri-t1-x2 amp=auto") and "PASS" in r for r in rows)
    assert all("FAIL" not in r for r in rows)
