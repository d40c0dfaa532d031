#!/usr/bin/env bash
# Build the Kubernetes control-plane binaries the k8s tests run against, from Go modules.
#
# Why: there is no Docker and no registry ships kube-apiserver, so the tests use real
# binaries built through the Go module proxy with the `go` command, cached by version.
#
# Builds kube-apiserver, kube-controller-manager and kubectl (k8s.io/kubernetes, through a
# wrapper module whose staging `replace` lines are derived from that release's go.mod),
# etcd (at the version that release pins, in its own wrapper), helm (go install) and
# SeaweedFS's `weed` (the S3 server of the object-storage tests, in its own wrapper).
#
# Cache: ${KONTRAST_TESTBIN:-$HOME/.cache/kontrast/testbin}/<name>-<version>/ per component,
# plus bin-<k8s>/ with links to all of them. The last line on stdout is that bin dir.
# A warm run runs no `go` command at all. Logs go to stderr.
#
# Also builds Kueue's manager (sigs.k8s.io/kueue/cmd/kueue) and caches, beside it, the CRDs and
# webhook configurations of that release, copied from the module (never committed).
#
# Env: K8S_VERSION (default 1.34.4), HELM_VERSION (3.19.5), ETCD_VERSION (default: what
# k8s.io/kubernetes pins for go.etcd.io/etcd/client/v3), KUEUE_VERSION (0.17.0), SEAWEEDFS_VERSION
# (a pseudo-version: SeaweedFS's tags are not semver), KONTRAST_TESTBIN.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.34.4}
HELM_VERSION=${HELM_VERSION:-3.19.5}
KUEUE_VERSION=${KUEUE_VERSION:-0.17.0}
SEAWEEDFS_VERSION=${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}
ROOT=${KONTRAST_TESTBIN:-$HOME/.cache/kontrast/testbin}
K8S_MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)

export CGO_ENABLED=0
# Two cores here: keep parallelism explicit and memory bounded. Keep any GOFLAGS the caller set.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-p=2 -buildvcs=false"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

log() { echo "[k8s-testbin] $*" >&2; }
# shellcheck source=wrapper-gomod.sh
. "$(dirname "$0")/wrapper-gomod.sh"
# Throw-away wrapper-module dirs live under WORK; removed on exit, also on failure.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

k8s_dir=$ROOT/kubernetes-v$K8S_VERSION
helm_dir=$ROOT/helm-v$HELM_VERSION
kueue_dir=$ROOT/kueue-v$KUEUE_VERSION
weed_dir=$ROOT/seaweedfs-$SEAWEEDFS_VERSION
bin_dir=$ROOT/bin-k8s-v$K8S_VERSION
mkdir -p "$ROOT"
# Two cold runs at once (make test beside a test that asks for kubectl) once raced: one
# `rm -rf`ed the other's kubernetes-*.tmp mid-build. The build holds an flock; the second waits,
# then finds everything cached.
exec 9>"$ROOT/.testbin.lock"
if ! flock -n 9; then
    log "another build holds $ROOT/.testbin.lock; waiting"
    flock 9
fi

# --- kube-apiserver, kube-controller-manager, kubectl ---------------------------------
build_kubernetes() {
    local work=$WORK/kubernetes tag=v$K8S_VERSION staging_tag=v0.${K8S_VERSION#1.}
    mkdir -p "$work"
    log "downloading k8s.io/kubernetes@$tag"
    local gomod info
    gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$tag" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    info=${gomod%.mod}.info
    [ -s "$gomod" ] || { log "no go.mod for k8s.io/kubernetes@$tag"; return 1; }

    wrapper_gomod "$gomod" local.test/k8s-testbin "$tag" >"$work/go.mod"
    log "wrapper go.mod: $(grep -c ' => ' "$work/go.mod") staging replaces -> $staging_tag"

    local pkgs="k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl"
    (cd "$work" && go get $(for p in $pkgs; do echo "$p@$tag"; done))

    local ldflags
    ldflags=$(k8s_ldflags "$info" "$tag")
    local etcd_version
    etcd_version=$(sed -n 's|^[[:space:]]*go.etcd.io/etcd/client/v3 v\([^[:space:]]*\).*|\1|p' "$gomod" | head -1)

    rm -rf "$k8s_dir.tmp" && mkdir -p "$k8s_dir.tmp"
    log "building $pkgs (slow when cold)"
    (cd "$work" && go build -trimpath -ldflags "$ldflags" -o "$k8s_dir.tmp/" $pkgs)
    echo "$etcd_version" >"$k8s_dir.tmp/etcd-version"
    rm -rf "$k8s_dir" && mv "$k8s_dir.tmp" "$k8s_dir"
}

# --- etcd (the version k8s pins), in its own wrapper so its deps don't touch k8s's -----
build_etcd() {
    local dir=$1 version=$2 work=$WORK/etcd
    mkdir -p "$work"
    log "building etcd v$version"
    (cd "$work" && go mod init local.test/etcd-testbin >/dev/null 2>&1 &&
        go get "go.etcd.io/etcd/server/v3@v$version" &&
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp" &&
        go build -trimpath -ldflags "-s -w" -o "$dir.tmp/etcd" go.etcd.io/etcd/server/v3)
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# --- helm ---------------------------------------------------------------------------
build_helm() {
    local work=$WORK/helm
    mkdir -p "$work"
    log "building helm v$HELM_VERSION"
    local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
    ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$K8S_MINOR"
    ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$K8S_MINOR"
    rm -rf "$helm_dir.tmp" && mkdir -p "$helm_dir.tmp"
    (cd "$work" && GOBIN="$helm_dir.tmp" go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION")
    rm -rf "$helm_dir" && mv "$helm_dir.tmp" "$helm_dir"
}

# --- Kueue: the manager, plus its CRDs and webhook configurations from the same module ---
build_kueue() {
    local work=$WORK/kueue mod=sigs.k8s.io/kueue tag=v$KUEUE_VERSION
    mkdir -p "$work"
    log "building kueue $tag"
    local json src build_date
    json=$(cd "$work" && go mod download -json "$mod@$tag")
    src=$(echo "$json" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    [ -d "$src/config/components/crd/bases" ] || { log "no CRDs in $mod@$tag ($src)"; return 1; }
    build_date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$(echo "$json" | sed -n 's/.*"Info": "\(.*\)".*/\1/p')")
    local ldflags="-s -w -X $mod/pkg/version.GitVersion=$tag -X $mod/pkg/version.BuildDate=${build_date:-unknown}"
    rm -rf "$kueue_dir.tmp" && mkdir -p "$kueue_dir.tmp/crds"
    (cd "$work" && GOBIN="$kueue_dir.tmp" go install -trimpath -ldflags "$ldflags" "$mod/cmd/kueue@$tag")
    cp "$src"/config/components/crd/bases/*.yaml "$kueue_dir.tmp/crds/"
    cp "$src/config/components/webhook/manifests.yaml" "$kueue_dir.tmp/webhooks.yaml"
    chmod -R u+w "$kueue_dir.tmp"
    rm -rf "$kueue_dir" && mv "$kueue_dir.tmp" "$kueue_dir"
}

# --- SeaweedFS weed (S3 gateway for the s3 tests) -------------------------------------
build_seaweedfs() {
    local work=$WORK/seaweedfs module=github.com/seaweedfs/seaweedfs
    mkdir -p "$work"
    log "building SeaweedFS weed $SEAWEEDFS_VERSION (slow when cold)"
    local gomod
    gomod=$(cd "$work" && go mod download -json "$module@$SEAWEEDFS_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    [ -s "$gomod" ] || { log "no go.mod for $module@$SEAWEEDFS_VERSION"; return 1; }
    # A dependency's replace lines are ignored (and `go install pkg@version` refuses a module
    # that has any), so the wrapper carries SeaweedFS's own module-to-module replaces.
    {
        echo "module local.test/seaweedfs-testbin"
        echo
        sed -n 's/^go \(.*\)/go \1/p' "$gomod" | head -1
        echo
        echo "require $module $SEAWEEDFS_VERSION"
        echo
        grep -E '^replace [^ ]+ => [^ .][^ ]* v' "$gomod" || true
    } >"$work/go.mod"
    rm -rf "$weed_dir.tmp" && mkdir -p "$weed_dir.tmp"
    (cd "$work" && go get "$module/weed@$SEAWEEDFS_VERSION" &&
        go build -trimpath -ldflags "-s -w" -o "$weed_dir.tmp/weed" "$module/weed")
    rm -rf "$weed_dir" && mv "$weed_dir.tmp" "$weed_dir"
}

if [ ! -x "$k8s_dir/kube-apiserver" ] || [ ! -x "$k8s_dir/kube-controller-manager" ] ||
    [ ! -x "$k8s_dir/kubectl" ] || [ ! -s "$k8s_dir/etcd-version" ]; then
    build_kubernetes
fi
ETCD_VERSION=${ETCD_VERSION:-$(cat "$k8s_dir/etcd-version")}
etcd_dir=$ROOT/etcd-v$ETCD_VERSION
[ -x "$etcd_dir/etcd" ] || build_etcd "$etcd_dir" "$ETCD_VERSION"
[ -x "$helm_dir/helm" ] || build_helm
[ -x "$kueue_dir/kueue" ] && [ -s "$kueue_dir/webhooks.yaml" ] || build_kueue
[ -x "$weed_dir/weed" ] || build_seaweedfs

mkdir -p "$bin_dir"
for f in kube-apiserver kube-controller-manager kubectl; do ln -sfn "$k8s_dir/$f" "$bin_dir/$f"; done
ln -sfn "$etcd_dir/etcd" "$bin_dir/etcd"
ln -sfn "$helm_dir/helm" "$bin_dir/helm"
ln -sfn "$kueue_dir/kueue" "$bin_dir/kueue"
ln -sfn "$kueue_dir" "$bin_dir/kueue-config"
ln -sfn "$weed_dir/weed" "$bin_dir/weed"

log "kube-apiserver $("$bin_dir/kube-apiserver" --version 2>&1), etcd $("$bin_dir/etcd" --version | head -1 | awk '{print $3}'), $("$bin_dir/helm" version --short 2>&1)"
echo "$bin_dir"
