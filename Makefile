# The two set-up commands of the README: `make train` and `make test`.
# Everything they need is installed here, so they work on a fresh machine.

VENV ?= .venv
PYTHON ?= python3

.PHONY: venv train test testbin node images test-fast chromium

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

## The node tier's binaries (cached like testbin): kubelet, kube-proxy, kube-scheduler, the pause
## binary, CoreDNS and the OCI registry from Go modules; containerd, runc, the CNI plugins,
## buildah/podman and debootstrap from Debian (apt-get as root when missing).
node: testbin
	bash tools/k8s-node/build.sh

## Both images (debootstrap base, buildah, layer cache) pushed to the local registry's storage
## (~/.cache/kontrast/images/registry), which the node tier serves. Your own registry:
##   tools/images/build.sh --registry registry.example.com/ml
images: node
	bash tools/images/build.sh

## Headless Chromium for the report's browser test (Debian's package; installed as root when missing).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

## Every test: unit, real control plane (k8s), operator end to end (e2e), distributed, S3 (s3),
## the real node (node: the images as containers under kubelet/containerd) and the fault matrix (faults).
test: venv testbin node images chromium
	$(VENV)/bin/pytest

## The tests that need neither the control plane, several processes, the S3 server, the node, MLflow's
## server nor the fault matrix.
test-fast: venv chromium
	$(VENV)/bin/pytest -m "not k8s and not e2e and not distributed and not s3 and not node and not mlflow and not faults"
