#!/usr/bin/env bash
# Builds the dev-cluster binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kwok, helm) from the Go module proxy into a versioned cache folder outside the repository.
# Rebuilds only what is missing. Prints the bin folder on the last line of stdout.
#
# Versions are fixed by the tools modules under hack/tools/ (go.mod / go.sum are committed).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="v1.36.3"
STAGING_VERSION="v0.36.3"
ETCD_VERSION="v3.6.16"
KWOK_VERSION="v0.8.0"
HELM_VERSION="v3.22.0"

CACHE_ROOT="${FTO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}"
BIN="$CACHE_ROOT/tools-k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}-helm-${HELM_VERSION}/bin"
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
if ! have etcd kwok helm kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  exec 9>"$BIN/../.build.lock"
  if ! flock -n 9; then
    log "another build of the tools is running; waiting for it"
    flock 9
  fi
  rm -rf "$STAGE"; mkdir -p "$STAGE"
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
