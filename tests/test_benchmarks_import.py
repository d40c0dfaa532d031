"""Every benchmark still imports against the current code.

Benchmarks run by hand, not in CI, so a renamed module breaks them silently (graded.py kept
importing ``kontrast.trainer.memory`` after it became ``accumulation``). Importing a
benchmark runs its module level (its imports and monkeypatch targets) but not ``main``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

_IMPORT_ALL = """
import importlib.util, sys, traceback
failed = []
for path in sys.argv[1:]:
    name = "bench_" + path.rsplit("/", 1)[-1][:-3]
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception:
        failed.append(path + ":\\n" + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_imports():
    scripts = sorted(str(p) for p in BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 10, scripts
    # One fresh interpreter: benchmarks put their own folders on sys.path.
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *scripts], capture_output=True, text=True,
                          cwd=BENCHMARKS, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
