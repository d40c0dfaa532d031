"""operator/install.sh for real, into a fresh virtual environment (what operator/Dockerfile does).

Needs the package index (PyPI); ~10 s with a warm pip cache.
"""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_operator_installs_without_torch(tmp_path):
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    env = {**os.environ, "PYTHON": str(python)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["sh", str(REPO / "operator" / "install.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kontrast operator installed" in proc.stdout
    # The image's entry point parses its arguments (no cluster needed for --help).
    out = subprocess.run([str(python), "-m", "kontrast.operator", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--standalone" in out.stdout
