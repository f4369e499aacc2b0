#!/usr/bin/env bash
# Builds the Kubernetes control-plane binaries the local cluster runs (kube-apiserver,
# kube-controller-manager, kube-scheduler v1.20.2) from Debian bookworm's source package, once,
# into a cache outside the repository. Later runs find the cache and return at once.
# Needs root (apt) and network access to Debian's mirrors. Idempotent.
set -euo pipefail

CACHE_DIR=${AMBIENT_CACHE_DIR:-$HOME/.cache/ambient-agent}
K8S_VERSION=v1.20.2
BIN_DIR=$CACHE_DIR/kubernetes-$K8S_VERSION/bin
BUILD_DIR=$CACHE_DIR/kubernetes-build
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

log() { printf '[build-control-plane] %s\n' "$*" >&2; }

on_error() {
  local rc=$?
  log "FAILED (exit $rc) at line $1."
  log "What to do: read the output above; common causes are no access to deb.debian.org"
  log "(check 'apt-get update'), a full disk (check 'df -h $CACHE_DIR'), or a half-finished build:"
  log "remove $BUILD_DIR and run this script again. The binaries land in $BIN_DIR."
  exit "$rc"
}
trap 'on_error $LINENO' ERR

all_cached() {
  local b
  for b in "${BINARIES[@]}"; do [ -x "$BIN_DIR/$b" ] || return 1; done
}

if all_cached; then
  log "cached: $BIN_DIR"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "must run as root (it installs Debian packages)"; exit 1
fi

started=$(date +%s)
SRC_LIST=/etc/apt/sources.list.d/ambient-agent-deb-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null; then
  log "adding a deb-src entry for bookworm ($SRC_LIST)"
  cat >"$SRC_LIST" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
log "apt-get update"
apt-get update -qq || log "apt-get update reported errors (an unreachable extra repository is harmless); continuing"
log "installing build dependencies"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  golang-go rsync golang-github-modern-go-reflect2-dev dpkg-dev make >/dev/null

mkdir -p "$BUILD_DIR"
cd "$BUILD_DIR"
if ! ls kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
  log "downloading the kubernetes source package"
  apt-get source --download-only kubernetes >/dev/null
fi
TREE=$BUILD_DIR/tree
if [ ! -f "$TREE/.prepared" ]; then
  log "unpacking the source tree"
  rm -rf "$TREE" "$BUILD_DIR/unpack"
  mkdir -p "$BUILD_DIR/unpack"
  tar -C "$BUILD_DIR/unpack" -xzf kubernetes_*.orig.tar.gz
  top=$(find "$BUILD_DIR/unpack" -mindepth 1 -maxdepth 1 -type d | head -n1)
  mv "$top" "$TREE"
  rmdir "$BUILD_DIR/unpack"
  log "replacing vendored reflect2 1.0.1 with Debian's 1.0.2 (1.0.1 panics on Go >= 1.18)"
  R=$TREE/vendor/github.com/modern-go/reflect2
  rm -f "$R"/*.go "$R"/*.s
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$R"/
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$R"/ 2>/dev/null || true
  rm -f "$R"/*_test.go
  sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#' \
    "$TREE/vendor/modules.txt" "$TREE/go.mod"
  touch "$TREE/.prepared"
fi

GOPATH_DIR=$BUILD_DIR/gopath
mkdir -p "$GOPATH_DIR/src/k8s.io"
ln -sfn "$TREE" "$GOPATH_DIR/src/k8s.io/kubernetes"
cd "$GOPATH_DIR/src/k8s.io/kubernetes"
# A failed earlier build leaves empty generator binaries behind that break the next one.
find _output -type f -size 0 -delete 2>/dev/null || true
missing=()
for b in "${BINARIES[@]}"; do [ -x "$BIN_DIR/$b" ] || missing+=("cmd/$b"); done
log "building ${missing[*]} (about 5 minutes cold on 2 cores; log: $BUILD_DIR/build.log)"
env GOPATH="$GOPATH_DIR" CGO_ENABLED=0 KUBE_GIT_VERSION=$K8S_VERSION \
  make WHAT="${missing[*]}" >"$BUILD_DIR/build.log" 2>&1 || {
    log "make failed; last lines of $BUILD_DIR/build.log:"
    tail -n 30 "$BUILD_DIR/build.log" >&2
    false
  }
mkdir -p "$BIN_DIR"
for b in "${BINARIES[@]}"; do install -m 0755 "_output/bin/$b" "$BIN_DIR/$b"; done
log "done in $(( $(date +%s) - started ))s: $BIN_DIR"
