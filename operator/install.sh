#!/bin/sh
# Install the kontrast operator (kontrast + its `operator` extra: kopf, kubernetes; no torch)
# into the Python environment of $PYTHON (default: python3). Used by operator/Dockerfile and
# run for real by tests/controller/test_images.py in a fresh virtual environment.
#
# Usage: operator/install.sh [SOURCE]    SOURCE: the kontrast checkout (default: the repo root)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=${1:-$(dirname "$HERE")}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m pip install --disable-pip-version-check "$SRC[operator]"

# Smoke test: the operator imports, and torch stayed out of the image.
cd /  # import the installed package, not the checkout
"$PYTHON" - <<'PY'
import importlib.util, sys
import kopf, kubernetes  # noqa: F401
import kontrast.operator.handlers  # noqa: F401  (registers the kopf handlers)
from kontrast.api import crd
assert crd()["metadata"]["name"] == "trainjobs.kontrast.dev"
if importlib.util.find_spec("torch") is not None:
    sys.exit("torch must not be installed in the operator image")
print("kontrast operator installed: kopf", kopf.__version__ if hasattr(kopf, "__version__") else "")
PY
