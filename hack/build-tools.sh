#!/usr/bin/env bash
# Builds the dev-cluster binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kwok, helm) from the Go module proxy into a versioned cache folder outside the repository.
# Rebuilds only what is missing. Prints the bin folder on the last line of stdout.
#
#   hack/build-tools.sh          the dev-cluster binaries (above)
#   hack/build-tools.sh kueue    Kueue's manager, in its own cache folder (tools-kueue-VERSION/bin/kueue, with
#                                Kueue's CRDs copied from the module source into tools-kueue-VERSION/crds/);
#                                prints that bin folder instead
#
# Versions are fixed by the tools modules under hack/tools/ (go.mod / go.sum are committed).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="v1.36.3"
STAGING_VERSION="v0.36.3"
ETCD_VERSION="v3.6.16"
KWOK_VERSION="v0.8.0"
HELM_VERSION="v3.22.0"
KUEUE_VERSION="v0.17.0"  # must match hack/tools/kueue/go.mod

CACHE_ROOT="${FTO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}"
case "${1:-k8s}" in
  k8s) BIN="$CACHE_ROOT/tools-k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}-helm-${HELM_VERSION}/bin" ;;
  kueue) BIN="$CACHE_ROOT/tools-kueue-${KUEUE_VERSION}/bin" ;;
  *) echo "usage: $0 [k8s|kueue]" >&2; exit 2 ;;
esac
mkdir -p "$BIN"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { echo "[build-tools $(date +%H:%M:%S)] $*" >&2; }

have() { for b in "$@"; do [ -x "$BIN/$b" ] || return 1; done; }

# Go writes each binary into a staging folder first, so an interrupted build never leaves a partial
# binary that `have` would take for a finished one.
STAGE="$BIN/../.staging"
publish() { for b in "$@"; do mv -f "$STAGE/$b" "$BIN/$b"; done; }

need_go() {
  command -v go >/dev/null || { log "Go is needed to build the dev-cluster tools (https://go.dev/dl/, 1.26+)"; exit 1; }
}

# One build at a time per cache folder (several test sessions or make targets may ask at once).
lock_and_stage() {
  exec 9>"$BIN/../.build.lock"
  if ! flock -n 9; then
    log "another build of the tools is running; waiting for it"
    flock 9
  fi
  rm -rf "$STAGE"; mkdir -p "$STAGE"
}

# Kueue's manager, in its own module (Kueue pins its own k8s.io/* versions) and its own cache folder, so
# that a Kueue upgrade never invalidates the dev-cluster binaries. Its CRDs (config/components/crd/bases in
# the module source) are copied next to it: tests apply them from there, nothing is vendored.
if [ "${1:-k8s}" = kueue ]; then
  KUEUE_CRDS="$BIN/../crds"
  if ! have kueue; then
    lock_and_stage
  fi
  if ! have kueue; then
    log "building Kueue $KUEUE_VERSION (cold: ~8 min on 2 cores, downloads ~550 MB of modules)"
    need_go
    start=$(date +%s)
    # Downloads the module (and so its source, for the CRDs) and checks the cache folder's name.
    (cd "$HERE/tools/kueue" && go mod download sigs.k8s.io/kueue)
    read -r pinned src < <(cd "$HERE/tools/kueue" && go list -m -f '{{.Version}} {{.Dir}}' sigs.k8s.io/kueue)
    [ "$pinned" = "$KUEUE_VERSION" ] || { log "hack/tools/kueue/go.mod pins Kueue $pinned, this script $KUEUE_VERSION"; exit 1; }
    (cd "$HERE/tools/kueue" && go build -trimpath \
        -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
        -o "$STAGE/kueue" sigs.k8s.io/kueue/cmd/kueue)
    rm -rf "$STAGE/crds"; mkdir -p "$STAGE/crds"
    cp "$src"/config/components/crd/bases/*.yaml "$STAGE/crds/"
    chmod u+w "$STAGE"/crds/*.yaml  # the module cache is read-only
    rm -rf "$KUEUE_CRDS"; mv "$STAGE/crds" "$KUEUE_CRDS"
    publish kueue  # last: a kueue binary means its CRDs are there too
    log "Kueue ready in $BIN ($(( $(date +%s) - start ))s)"
  fi
  echo "$BIN"
  exit 0
fi

if ! have etcd kwok helm kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  lock_and_stage
fi

build_k8s() {
  have kube-apiserver kube-controller-manager kube-scheduler kubectl && return 0
  log "building Kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl)"
  log "  cold: ~20 min on 2 cores, downloads ~1 GB of modules; progress below"
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w"
  ld+=" -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  ld+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  ld+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  ld+=" -X k8s.io/component-base/version.gitTreeState=clean"
  need_go
  (cd "$HERE/tools/k8s" && go mod download -x 2>&1 | grep -c '^# get' >/dev/null || true)
  # One invocation, so that shared packages compile once. -v prints each package as it is compiled.
  (cd "$HERE/tools/k8s" && go build -v -trimpath -ldflags "$ld" -o "$STAGE/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl 2>&1 \
    | awk '{n++; if (n % 250 == 0) {printf "[build-tools] k8s: %d packages compiled (last: %s)\n", n, $0; fflush()}}' >&2)
  publish kube-apiserver kube-controller-manager kube-scheduler kubectl
}

build_etcd() {
  have etcd && return 0
  log "building etcd $ETCD_VERSION"
  need_go
  (cd "$HERE/tools/etcd" && go build -trimpath -ldflags "-s -w" -o "$STAGE/etcd" go.etcd.io/etcd/server/v3)
  publish etcd
}

build_misc() {
  have kwok helm && return 0
  log "building kwok $KWOK_VERSION and helm $HELM_VERSION"
  need_go
  (cd "$HERE/tools/misc" && go build -trimpath \
      -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
      -o "$STAGE/" sigs.k8s.io/kwok/cmd/kwok helm.sh/helm/v3/cmd/helm)
  publish kwok helm
}

start=$(date +%s)
build_etcd
build_misc
build_k8s
log "tools ready in $BIN ($(( $(date +%s) - start ))s)"
echo "$BIN"
