#!/usr/bin/env bash
# Build (or reuse from the cache) a real Kubernetes node for the `node` test tier:
#
#   kubelet, kube-proxy, kube-scheduler  k8s.io/kubernetes, the same release as the API server
#                                        (tools/k8s-testbin/build.sh), same wrapper-module recipe,
#                                        so the Go build cache is shared with the control plane
#   pause                                the sandbox image's binary, from the same module's
#                                        build/pause/linux/pause.c (gcc -static), as upstream
#   coredns                              github.com/coredns/coredns, a main with only the plugins
#                                        cluster DNS needs (kubernetes, cache, health, ready, ...)
#   registry                             github.com/distribution/distribution/v3 (OCI registry)
#   containerd, runc, CNI plugins        Debian's packages (containerd 1.6, runc 1.1.5,
#                                        containernetworking-plugins), installed with apt-get
#                                        when missing (root), with buildah/podman/debootstrap
#                                        for tools/images/build.sh and iptables for kube-proxy
#
# Cache: ${KONTRAST_TESTBIN:-$HOME/.cache/kontrast/testbin}/<name>-<version>/ per component and
# node-k8s-v<k8s>/ with links to every binary (and cni/ -> the CNI plugin folder). The last
# line on stdout is that folder. A warm run runs no `go` and no apt-get. Logs go to stderr.
# Two cold runs cannot race: the whole build holds an flock on $ROOT/.node.lock.
#
# Env: K8S_VERSION (default 1.34.4, as tools/k8s-testbin), COREDNS_VERSION (1.14.7),
# DISTRIBUTION_VERSION (3.1.2), KONTRAST_TESTBIN, KONTRAST_NO_APT=1 (never run apt-get).
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.34.4}
COREDNS_VERSION=${COREDNS_VERSION:-1.14.7}
DISTRIBUTION_VERSION=${DISTRIBUTION_VERSION:-3.1.2}
ROOT=${KONTRAST_TESTBIN:-$HOME/.cache/kontrast/testbin}
K8S_MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
DEBS="containerd runc containernetworking-plugins iptables conntrack buildah podman skopeo debootstrap gcc libc6-dev"

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-p=2 -buildvcs=false"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

log() { echo "[k8s-node] $*" >&2; }
# shellcheck source=../k8s-testbin/wrapper-gomod.sh
. "$(dirname "$0")/../k8s-testbin/wrapper-gomod.sh"
mkdir -p "$ROOT"
exec 9>"$ROOT/.node.lock"
if ! flock -n 9; then
    log "another build holds $ROOT/.node.lock; waiting"
    flock 9
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

node_dir=$ROOT/kubernetes-node-v$K8S_VERSION
coredns_dir=$ROOT/coredns-v$COREDNS_VERSION
registry_dir=$ROOT/distribution-v$DISTRIBUTION_VERSION
bin_dir=$ROOT/node-k8s-v$K8S_VERSION

# --- Debian packages -------------------------------------------------------------------
install_debs() {
    local missing="" p
    for p in $DEBS; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=" $p"
    done
    [ -z "$missing" ] && return 0
    if [ -n "${KONTRAST_NO_APT:-}" ] || [ "$(id -u)" != 0 ]; then
        log "missing Debian packages:$missing (install them as root: apt-get install$missing)"
        return 1
    fi
    log "apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >&2
}

# --- kubelet, kube-proxy, kube-scheduler (+ pause) -------------------------------------
build_node() {
    local work=$WORK/kubernetes tag=v$K8S_VERSION
    mkdir -p "$work"
    local json gomod info src
    json=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$tag")
    gomod=$(echo "$json" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    src=$(echo "$json" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    info=${gomod%.mod}.info
    [ -s "$gomod" ] || { log "no go.mod for k8s.io/kubernetes@$tag"; return 1; }
    # The same wrapper module as tools/k8s-testbin/build.sh: staging modules -> published tags.
    wrapper_gomod "$gomod" local.test/k8s-node "$tag" >"$work/go.mod"
    local pkgs="k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kube-scheduler"
    (cd "$work" && go get $(for p in $pkgs; do echo "$p@$tag"; done))
    local ldflags
    ldflags=$(k8s_ldflags "$info" "$tag")
    rm -rf "$node_dir.tmp" && mkdir -p "$node_dir.tmp"
    log "building $pkgs (slow when cold)"
    (cd "$work" && nice go build -trimpath -ldflags "$ldflags" -o "$node_dir.tmp/" $pkgs)
    # The sandbox ("pause") binary exactly as build/pause/Makefile compiles it.
    local pause_tag
    pause_tag=$(sed -n 's/^TAG ?= *//p' "$src/build/pause/Makefile")
    gcc -Os -Wall -Werror -static -DVERSION="v$pause_tag-kontrast" -o "$node_dir.tmp/pause" "$src/build/pause/linux/pause.c"
    strip "$node_dir.tmp/pause"
    echo "$pause_tag" >"$node_dir.tmp/pause-version"
    rm -rf "$node_dir" && mv "$node_dir.tmp" "$node_dir"
}

# --- CoreDNS with the plugins cluster DNS needs ------------------------------------------
build_coredns() {
    local work=$WORK/coredns mod=github.com/coredns/coredns tag=v$COREDNS_VERSION
    mkdir -p "$work"
    log "building coredns $tag"
    local gomod
    gomod=$(cd "$work" && go mod download -json "$mod@$tag" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    {
        echo "module local.test/coredns-node"
        echo
        sed -n 's/^go \(.*\)/go \1/p' "$gomod" | head -1
        echo
        echo "require $mod $tag"
    } >"$work/go.mod"
    # Upstream's main imports core/plugin (every plugin: cloud DNS SDKs and all); this one
    # registers only these, in plugin.cfg's order (dnsserver.Directives decides the order).
    local plugins="bind ready health errors log loadbalance cache kubernetes"
    {
        echo "package main"
        echo
        echo "import ("
        echo "	\"$mod/core/dnsserver\""
        echo "	\"$mod/coremain\""
        for p in $plugins; do echo "	_ \"$mod/plugin/$p\""; done
        echo ")"
        echo
        echo "func init() {"
        echo "	dnsserver.Directives = []string{$(for p in $plugins; do printf '"%s", ' "$p"; done)}"
        echo "}"
        echo
        echo "func main() { coremain.Run() }"
    } >"$work/main.go"
    rm -rf "$coredns_dir.tmp" && mkdir -p "$coredns_dir.tmp"
    (cd "$work" && go get "$mod@$tag" && go mod tidy >&2 &&
        nice go build -trimpath -ldflags "-s -w -X $mod/coremain.GitCommit=$tag" -o "$coredns_dir.tmp/coredns" .)
    rm -rf "$coredns_dir" && mv "$coredns_dir.tmp" "$coredns_dir"
}

# --- the OCI registry (distribution v3) ------------------------------------------------
build_registry() {
    local work=$WORK/registry mod=github.com/distribution/distribution/v3 tag=v$DISTRIBUTION_VERSION
    mkdir -p "$work"
    log "building registry $tag"
    rm -rf "$registry_dir.tmp" && mkdir -p "$registry_dir.tmp"
    (cd "$work" && GOBIN="$registry_dir.tmp" nice go install -trimpath \
        -ldflags "-s -w -X $mod/version.version=$tag" "$mod/cmd/registry@$tag")
    rm -rf "$registry_dir" && mv "$registry_dir.tmp" "$registry_dir"
}

install_debs
[ -x "$node_dir/kubelet" ] && [ -x "$node_dir/kube-proxy" ] && [ -x "$node_dir/kube-scheduler" ] &&
    [ -x "$node_dir/pause" ] || build_node
[ -x "$coredns_dir/coredns" ] || build_coredns
[ -x "$registry_dir/registry" ] || build_registry

mkdir -p "$bin_dir"
for f in kubelet kube-proxy kube-scheduler pause pause-version; do ln -sfn "$node_dir/$f" "$bin_dir/$f"; done
ln -sfn "$coredns_dir/coredns" "$bin_dir/coredns"
ln -sfn "$registry_dir/registry" "$bin_dir/registry"
for f in containerd containerd-shim-runc-v2 ctr runc iptables buildah podman skopeo; do
    p=$(command -v "$f" || true)
    [ -n "$p" ] || { log "$f not found on PATH"; exit 1; }
    ln -sfn "$p" "$bin_dir/$f"
done
ln -sfn /usr/lib/cni "$bin_dir/cni"
for f in bridge host-local loopback portmap; do
    [ -x "$bin_dir/cni/$f" ] || { log "CNI plugin $f missing from /usr/lib/cni"; exit 1; }
done

log "kubelet $("$bin_dir/kubelet" --version 2>&1 | awk '{print $2}'), coredns $("$bin_dir/coredns" -version 2>&1 | head -1), $("$bin_dir/registry" --version 2>&1 | awk '{print $NF}'), $(containerd --version | awk '{print $2, $3}'), runc $(runc --version | head -1 | awk '{print $3}')"
echo "$bin_dir"
