#!/usr/bin/env bash
# Build kontrast's images with buildah from the repository's own Dockerfiles and push them.
#
#   trainer   trainer/Dockerfile  (torch + open_clip + kontrast's trainer; several GB with CUDA torch)
#   operator  operator/Dockerfile (kopf + kontrast's operator)
#   pause     the pod sandbox image (the pause binary from tools/k8s-node/build.sh); only for
#             clusters that cannot pull registry.k8s.io/pause, such as the test node
#
# Usage: tools/images/build.sh [--registry PREFIX] [--tag TAG] [--no-push] [IMAGE...]
#   --registry PREFIX  push to PREFIX/trainer:TAG, PREFIX/operator:TAG (e.g. registry.example.com/ml);
#                      default: the project's local registry (distribution, from
#                      tools/k8s-node/build.sh) started for the push on 127.0.0.1:31500 (the node tier's), its
#                      storage in $KONTRAST_IMAGES_CACHE/registry (the test tier serves the same folder)
#   --tag TAG          default: the first 12 hex digits of each image's ID, so a changed image never
#                      hides behind a tag a node has cached (pause: its upstream version)
#   --no-push          build only
#   IMAGE...           default: trainer operator pause (pause only for the local registry)
# Env: BASE_IMAGE (default: localhost/kontrast-base:bookworm from tools/images/base.sh, debootstrap),
#      PIP_EXTRA_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu for a CPU-only torch),
#      CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt: mounted read-only into build steps,
#      so pip trusts what the host trusts; never stored in an image),
#      COMPRESSION (zstd for the local registry, else gzip), TLS_VERIFY (true; false for the local
#      registry), KONTRAST_IMAGES_CACHE ($HOME/.cache/kontrast/images).
#
# Layer cache: buildah's own storage (--layers). A change under trainer/src rebuilds only the
# layers after `COPY kontrast ...` (seconds, a few MB); a change to the dependency lists in
# pyproject.toml rebuilds the torch layer. Builds hold an flock ($KONTRAST_IMAGES_CACHE/.build.lock).
# stdout ends with one line per image: NAME=REFERENCE (what was pushed, or the local name).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${KONTRAST_IMAGES_CACHE:-$HOME/.cache/kontrast/images}
REGISTRY=""
TAG=""
PUSH=1
IMAGES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --registry) REGISTRY=$2; shift 2 ;;
        --registry=*) REGISTRY=${1#*=}; shift ;;
        --tag) TAG=$2; shift 2 ;;
        --tag=*) TAG=${1#*=}; shift ;;
        --no-push) PUSH=""; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        trainer|operator|pause) IMAGES+=("$1"); shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
LOCAL_REGISTRY=""
[ -z "$REGISTRY" ] && [ -n "$PUSH" ] && LOCAL_REGISTRY=1
if [ ${#IMAGES[@]} -eq 0 ]; then
    IMAGES=(trainer operator)
    if [ -n "$LOCAL_REGISTRY" ]; then IMAGES+=(pause); fi
fi
case "$REGISTRY" in 127.0.0.1:*|localhost:*|"") TLS_VERIFY=${TLS_VERIFY:-false}; COMPRESSION=${COMPRESSION:-zstd} ;; esac
TLS_VERIFY=${TLS_VERIFY:-true}
COMPRESSION=${COMPRESSION:-gzip}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

log() { echo "[images] $*" >&2; }
mkdir -p "$CACHE"
exec 8>"$CACHE/.build.lock"
flock -n 8 || { log "another image build holds $CACHE/.build.lock; waiting"; flock 8; }
WORK=$(mktemp -d)
REGISTRY_PID=""
cleanup() {
    # (|| true: the registry dies of the SIGTERM, 143, and set -e would make that the script's status)
    if [ -n "$REGISTRY_PID" ]; then kill "$REGISTRY_PID" 2>/dev/null; wait "$REGISTRY_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

node_bin() { [ -n "${NODE_BIN:-}" ] || NODE_BIN=$(bash "$REPO/tools/k8s-node/build.sh" | tail -1); }

if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=$(bash "$HERE/base.sh" | tail -1)
fi

# Build steps run with runc (crun refuses hybrid cgroups), explicit rlimits (the hard
# RLIMIT_NOFILE may be below buildah's default), the host network and the host's CA bundle.
BUILD_ARGS=(--layers --runtime runc --network host --ulimit nofile=10000:10000 --ulimit nproc=4000:4000)
[ -n "${PIP_EXTRA_INDEX_URL:-}" ] && BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL")
[ -f "$CA_BUNDLE" ] && BUILD_ARGS+=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")

build() {  # name -> local image id on stdout
    local name=$1 start=$SECONDS
    case "$name" in
        trainer|operator)
            log "building $name from $name/Dockerfile (BASE_IMAGE=$BASE_IMAGE)"
            local ignore=()
            [ -f "$REPO/$name/Dockerfile.dockerignore" ] && ignore=(--ignorefile "$REPO/$name/Dockerfile.dockerignore")
            local base_arg=BASE_IMAGE
            [ "$name" = operator ] && base_arg=PYTHON_IMAGE
            nice buildah bud "${BUILD_ARGS[@]}" "${ignore[@]}" --build-arg "$base_arg=$BASE_IMAGE" --iidfile "$WORK/$name.iid" \
                -f "$REPO/$name/Dockerfile" -t "localhost/kontrast/$name:latest" "$REPO" >&2 ;;
        pause)
            node_bin
            mkdir -p "$WORK/pause"
            cp "$NODE_BIN/pause" "$WORK/pause/pause"
            printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$WORK/pause/Containerfile"
            buildah bud --layers --iidfile "$WORK/pause.iid" -f "$WORK/pause/Containerfile" \
                -t "localhost/kontrast/pause:$(cat "$NODE_BIN/pause-version")" "$WORK/pause" >&2 ;;
    esac
    log "$name built in $((SECONDS - start)) s"
    sed 's/^sha256://' "$WORK/$name.iid"
}

start_local_registry() {
    node_bin
    local port
    # The node tier's address (tests/harness/node.py): buildah remembers per registry address which
    # compressed blobs it holds, and zstd output differs run to run, so pushing the same image to
    # another address stores the 3 GB torch layer again.
    port=${KONTRAST_REGISTRY_PORT:-31500}
    mkdir -p "$CACHE/registry"
    cat >"$WORK/registry.yml" <<YML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $CACHE/registry}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port}
YML
    "$NODE_BIN/registry" serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
    REGISTRY_PID=$!
    local i
    for i in $(seq 100); do
        curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
        kill -0 "$REGISTRY_PID" 2>/dev/null || { cat "$WORK/registry.log" >&2; return 1; }
        sleep 0.1
    done
    REGISTRY=127.0.0.1:$port/kontrast
    log "local registry on 127.0.0.1:$port (storage $CACHE/registry)"
}

[ -n "$LOCAL_REGISTRY" ] && start_local_registry

refs=()
for name in "${IMAGES[@]}"; do
    id=$(build "$name")
    local_ref=localhost/kontrast/$name:latest
    tag=${TAG:-${id:0:12}}
    if [ "$name" = pause ]; then
        tag=$(cat "$NODE_BIN/pause-version"); local_ref=localhost/kontrast/pause:$tag
    fi
    if [ -n "$PUSH" ]; then
        ref=$REGISTRY/$name:$tag
        start=$SECONDS
        log "pushing $ref ($COMPRESSION)"
        buildah push --tls-verify="$TLS_VERIFY" --compression-format "$COMPRESSION" --quiet \
            "$local_ref" "docker://$ref" >&2
        log "$name pushed in $((SECONDS - start)) s"
    else
        ref=$local_ref
    fi
    refs+=("$name=$ref")
done
printf '%s\n' "${refs[@]}"
