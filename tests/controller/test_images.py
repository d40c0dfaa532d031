"""The images' install steps live in one script each, which the Dockerfiles run and tests run.

No Docker engine here: tests/e2e/test_operator_install.py installs the operator for real into
a fresh venv; the trainer's gigabytes are resolved (not downloaded) by pip's dry run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dockerfiles_run_the_install_scripts():
    op = (REPO / "operator" / "Dockerfile").read_text()
    assert "sh operator/install.sh /src" in op
    assert "[trainer]" not in op and "pip install" not in op  # only the script installs
    assert re.search(r"^USER 65532", op, re.M)
    tr = (REPO / "trainer" / "Dockerfile").read_text()
    assert "sh trainer/install.sh /src" in tr
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:", tr, re.M), "the CUDA base is a build argument"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", tr, re.M)
    assert 'CMD ["kontrast", "launch", "/etc/kontrast/trainjob.yaml"]' in tr


def test_every_path_the_dockerfiles_copy_exists():
    for dockerfile in (REPO / "operator" / "Dockerfile", REPO / "trainer" / "Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for src in line.split()[1:-1]:
                    assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"


def test_install_scripts_are_valid_shell():
    for script in ("operator/install.sh", "trainer/install.sh"):
        subprocess.run(["sh", "-n", str(REPO / script)], check=True)
        assert os.access(REPO / script, os.X_OK), script


def test_trainer_requirements_resolve():
    """pip's dry run of the trainer install against this environment: the script works and
    the trainer extra resolves (the full install is what builds the dev venv and the image)."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["sh", str(REPO / "trainer" / "install.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "trainer requirements resolve" in proc.stdout
