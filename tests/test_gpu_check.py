"""tools/gpu_check.py runs on a CPU at toy sizes (the GPU machine runs the full sizes)."""

import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


@pytest.mark.skipif(not TOOL.is_file(), reason="not a source checkout")
def test_gpu_check_quick_on_cpu():
    r = subprocess.run([sys.executable, str(TOOL), "--device", "cpu", "--quick"], capture_output=True, text=True, timeout=600)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = {line.split(":")[0].split(None, 1)[1]: line.split()[0] for line in lines if line.startswith(("PASS", "FAIL", "SKIP"))}
    assert checks == {"resume": "PASS", "encode fp16": "SKIP", "encode bf16": "PASS", "decode": "PASS"}
    assert lines[-1].startswith("gpu_check: 3 passed, 0 failed, 1 skipped")
