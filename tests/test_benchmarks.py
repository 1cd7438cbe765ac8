"""The benchmark scripts keep working (smoke runs; no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--images", "2",
           "--steps", "2", "--rounds", "1", "--prompt-len", "4", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "| 1. one image: ms per step |" in run.stdout
    data = json.loads(out.read_text())
    assert data["batch"]["images"] == 2 and data["meta"]["prompt_len"] == 4
    for key in ("reference_ms_per_step", "pez_ms_per_step", "ratio", "reference_peak_mb", "pez_peak_mb"):
        assert data["single"][key] >= 0
