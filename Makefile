# The two set-up commands of the README: `make train` and `make test`.
# Everything they need is installed here, so they work on a fresh machine.

VENV ?= .venv
PYTHON ?= python3

.PHONY: venv train test testbin test-fast chromium

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml trainer/install.sh
	$(PYTHON) -m venv $(VENV)
	PYTHON=$(abspath $(VENV))/bin/python sh trainer/install.sh --dev
	touch $@

## Train the example TrainJob locally (tiny model, synthetic data made on first use).
train: venv
	$(VENV)/bin/kontrast train examples/trainjob.yaml

## Build (or reuse from the cache) kube-apiserver, etcd, kube-controller-manager, kubectl, helm
## and SeaweedFS's weed (the S3 server of the s3 tests).
testbin:
	bash tools/k8s-testbin/build.sh

## Headless Chromium for the report's browser test (Debian's package; installed as root when missing).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

## Every test: unit, real control plane (k8s), operator end to end (e2e), distributed, S3 (s3),
## the fault matrix (faults).
test: venv testbin chromium
	$(VENV)/bin/pytest

## The tests that need neither the control plane, several processes, the S3 server, nor the fault matrix.
test-fast: venv chromium
	$(VENV)/bin/pytest -m "not k8s and not e2e and not distributed and not s3 and not faults"
