# Sourced by tools/k8s-testbin/build.sh and tools/k8s-node/build.sh (bash).
#
# wrapper_gomod GOMOD MODULE TAG: the go.mod of a throw-away module MODULE that builds
# k8s.io/kubernetes@TAG's commands. The release's own go.mod (GOMOD) maps each staging module to
# ./staging/src/...; a consumer must map it to the published tag v0.<minor>.<patch> instead.
# The list is derived from GOMOD, never hand-typed. Prints the go.mod; fails without staging lines.
wrapper_gomod() {
    local gomod=$1 module=$2 tag=$3
    local staging_tag=v0.${tag#v1.} staging go_line godebug
    staging=$(sed -n 's|^[[:space:]]*\(k8s.io/[^[:space:]]*\) => ./staging/src/k8s.io/.*|\1|p' "$gomod")
    [ -n "$staging" ] || { echo "no staging replaces found in $gomod" >&2; return 1; }
    go_line=$(sed -n 's/^go \(.*\)/\1/p' "$gomod" | head -1)
    godebug=$(grep '^godebug ' "$gomod" || true)
    echo "module $module"
    echo
    echo "go $go_line"
    [ -n "$godebug" ] && { echo; echo "$godebug"; }
    echo
    echo "require k8s.io/kubernetes $tag"
    echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $staging_tag"; done
    echo ")"
}

# k8s_ldflags INFO TAG: the -ldflags that stamp what hack/lib/version.sh stamps, so /version and
# --version report the real release (INFO: the module's .info file, for the build date).
k8s_ldflags() {
    local info=$1 tag=$2 minor build_date vpkg ldflags="-s -w"
    minor=$(echo "$tag" | cut -d. -f2)
    build_date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info")
    for vpkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $vpkg.gitVersion=$tag -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
        ldflags+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=${build_date:-1970-01-01T00:00:00Z}"
    done
    echo "$ldflags"
}
