#!/bin/sh
# Install the kontrast trainer (kontrast + its `trainer` and `mlflow` extras: torch, open_clip,
# the MLflow client, ...) into the Python environment of $PYTHON (default: python3). One script
# for trainer/Dockerfile and the development environment; tests/controller/test_images.py runs it with --dry-run (pip
# resolves every requirement without downloading gigabytes of wheels).
#
# Usage: trainer/install.sh [--dry-run] [--dev] [SOURCE]
#        trainer/install.sh --print-requirements [SOURCE]   the third-party requirements of
#                   kontrast[trainer,mlflow], one a line, read from SOURCE/pyproject.toml (needs
#                   Python >= 3.11 for tomllib; prints nothing on older ones)
#        trainer/install.sh --requirements FILE             install only those (the image's
#                   big dependency layer, built before the source is copied in)
#   --dev      also the test tools and the operator extra (a developer's or CI's venv)
#   SOURCE     the kontrast checkout (default: the repo root); --editable with --dev
# Wheels for another accelerator: set PIP_EXTRA_INDEX_URL (e.g. PyTorch's CPU-only index).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
DRY=""
DEV=""
SRC=""
MODE=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY="--dry-run --quiet" ;;
    --dev) DEV=1 ;;
    --print-requirements|--requirements) MODE=$arg ;;
    *) SRC=$arg ;;
  esac
done

if [ "$MODE" = --print-requirements ]; then
  "$PYTHON" - "${SRC:-$(dirname "$HERE")}/pyproject.toml" trainer mlflow <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python < 3.11: no separate dependency layer, the full install does it all
    sys.exit(0)
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras = project.get("optional-dependencies", {})
for req in project.get("dependencies", []) + [r for extra in sys.argv[2:] for r in extras.get(extra, [])]:
    print(req)
PY
  exit 0
fi
if [ "$MODE" = --requirements ]; then
  if [ -s "$SRC" ]; then "$PYTHON" -m pip install --disable-pip-version-check -r "$SRC"; fi
  exit 0
fi
SRC=${SRC:-$(dirname "$HERE")}

if [ -n "$DEV" ]; then
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install --disable-pip-version-check $DRY --editable "$SRC[trainer,mlflow,operator,dev,bench]"
else
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install --disable-pip-version-check $DRY "$SRC[trainer,mlflow]"
fi
[ -n "$DRY" ] && { echo "trainer requirements resolve"; exit 0; }

# Smoke test: the trainer and its launcher import; kopf stayed out of a trainer image.
cd /  # import the installed package, not the checkout
"$PYTHON" - <<PY
import importlib.util, sys
import torch, open_clip  # noqa: F401
import kontrast.trainer.cli.launch, kontrast.trainer.report.cluster_status  # noqa: F401
import mlflow.tracking  # noqa: F401 - the client of spec.tracking.mlflow
if not "$DEV" and importlib.util.find_spec("kopf") is not None:
    sys.exit("kopf must not be installed in the trainer image")
print("kontrast trainer installed: torch", torch.__version__, "cuda", torch.version.cuda)
PY
