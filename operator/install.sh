#!/bin/sh
# Install the kontrast operator (kontrast + its `operator` extra: kopf, kubernetes; no torch)
# into the Python environment of $PYTHON (default: python3). Used by operator/Dockerfile and
# run for real by tests/controller/test_images.py in a fresh virtual environment.
#
# Usage: operator/install.sh [SOURCE]    SOURCE: the kontrast checkout (default: the repo root)
#        operator/install.sh --print-requirements [SOURCE]   kontrast[operator]'s third-party
#                   requirements, one a line, from SOURCE/pyproject.toml (Python >= 3.11)
#        operator/install.sh --requirements FILE             install only those (the image's
#                   dependency layer, built before the source is copied in)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
case "${1:-}" in
  --print-requirements)
    "$PYTHON" - "${2:-$(dirname "$HERE")}/pyproject.toml" operator <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python < 3.11: no separate dependency layer
    sys.exit(0)
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
for req in project.get("dependencies", []) + project.get("optional-dependencies", {}).get(sys.argv[2], []):
    print(req)
PY
    exit 0 ;;
  --requirements)
    if [ -s "$2" ]; then "$PYTHON" -m pip install --disable-pip-version-check -r "$2"; fi
    exit 0 ;;
esac
SRC=${1:-$(dirname "$HERE")}

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
