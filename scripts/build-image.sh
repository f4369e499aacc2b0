#!/usr/bin/env bash
# Builds the ambient-agent container image from the Dockerfile without any registry, then proves it:
# `ambient-agent --help` and the unit tests run inside the built image.
#
# No registry is reachable on the development machines, so the base image is made locally: a
# `debootstrap --variant=minbase` Debian bookworm root filesystem (built once and cached as a tarball
# under $AMBIENT_CACHE_DIR, default ~/.cache/ambient-agent), imported with podman, and passed to the
# Dockerfile as `--build-arg BASE=...`. buildah builds and runs with chroot isolation, the mode that
# works here (podman run does not: hybrid cgroups). Needs root; installs debootstrap, buildah and
# podman with apt when they are missing. Environment: IMAGE (default localhost/ambient-agent:<version>),
# SKIP_TESTS=1 to stop after `--help`.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE_DIR=${AMBIENT_CACHE_DIR:-$HOME/.cache/ambient-agent}
BASE_IMAGE=localhost/debian:bookworm-minbase
BASE_TARBALL=$CACHE_DIR/images/debian-bookworm-minbase.tar
MIRROR=http://deb.debian.org/debian
VERSION=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$REPO/pyproject.toml")
IMAGE=${IMAGE:-localhost/ambient-agent:$VERSION}
# The host's CA bundle, for pip: where egress goes through a TLS-intercepting proxy, its CA is only
# in this bundle. It is mounted for the pip steps and never stored in the image.
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
# buildah bud's default limits are too low for apt and pip in a chroot here.
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)

log() { printf '[build-image] %s\n' "$*" >&2; }
phase_started=$(date +%s)
phase() {
  local now
  now=$(date +%s)
  log "$1 ($((now - phase_started)) s)"
  phase_started=$now
}

on_error() {
  local rc=$?
  log "FAILED (exit $rc) at line $1. Read the output above. Common causes: no access to"
  log "deb.debian.org or pypi.org, a full disk (df -h $CACHE_DIR /var/lib/containers), or a corrupt"
  log "cached base: remove $BASE_TARBALL and run 'buildah rmi $BASE_IMAGE', then try again."
  exit "$rc"
}
trap 'on_error $LINENO' ERR

if [ "$(id -u)" != 0 ]; then
  log "must run as root: debootstrap and buildah's chroot isolation need it"
  exit 1
fi

install_tools() {
  local missing=() tool
  for tool in debootstrap buildah podman; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# A minbase bookworm made to look like the official debian:bookworm-slim where it matters: the same
# apt sources (with updates and security), no documentation or translations installed by dpkg.
build_base_tarball() {
  local rootfs
  rootfs=$(mktemp -d "$CACHE_DIR/images/rootfs.XXXXXX")
  log "debootstrap --variant=minbase bookworm (once; cached as $BASE_TARBALL)"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  printf 'APT::Install-Recommends "false";\n' >"$rootfs/etc/apt/apt.conf.d/99no-recommends"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
  tar -C "$rootfs" -cf "$BASE_TARBALL.tmp" .
  mv "$BASE_TARBALL.tmp" "$BASE_TARBALL"
  rm -rf "$rootfs"
}

ensure_base_image() {
  mkdir -p "$CACHE_DIR/images"
  [ -s "$BASE_TARBALL" ] || build_base_tarball
  if ! podman image exists "$BASE_IMAGE"; then
    log "importing $BASE_TARBALL as $BASE_IMAGE"
    podman import "$BASE_TARBALL" "$BASE_IMAGE" >/dev/null
  fi
}

build_image() {
  log "building $IMAGE from $REPO/Dockerfile (BASE=$BASE_IMAGE)"
  buildah bud --isolation chroot "${ULIMITS[@]}" --layers \
    --build-arg "BASE=$BASE_IMAGE" --build-arg "VERSION=$VERSION" --secret "id=pip-ca,src=$HOST_CA_BUNDLE" \
    -t "$IMAGE" "$REPO"
}

# Runs inside a throw-away container of the image: the package under test is the one installed in
# the image's venv (the source tree is not copied, only tests/ and the files the tests read).
check_image() {
  local container dev_requirements
  container=$(buildah from "$IMAGE")
  # shellcheck disable=SC2064 # the container name is fixed now, on purpose
  trap "buildah rm $container >/dev/null" EXIT
  log "ambient-agent --help in the image"
  buildah run --isolation chroot "$container" -- ambient-agent --help
  if [ "${SKIP_TESTS:-0}" = 1 ]; then
    return
  fi
  buildah run --isolation chroot --user 0:0 "$container" -- mkdir -p /src
  local item
  for item in pyproject.toml tests deploy manifests scripts docs; do
    [ -e "$REPO/$item" ] && buildah copy --quiet "$container" "$REPO/$item" "/src/$item" >/dev/null
  done
  mapfile -t dev_requirements < <(python3 -c \
    'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["dev"]))' \
    "$REPO/pyproject.toml")
  mkdir -p "$CACHE_DIR/pip"
  log "installing the dev dependencies into the container (pip cache: $CACHE_DIR/pip)"
  buildah run --isolation chroot --user 0:0 -v "$CACHE_DIR/pip:/root/.cache/pip" \
    -v "$HOST_CA_BUNDLE:/run/host-ca.crt:ro" --env PIP_CERT=/run/host-ca.crt \
    "$container" -- pip install -q "${dev_requirements[@]}"
  # With the node agent's two capabilities, as the DaemonSet runs it: the data-plane tests open
  # IP_TRANSPARENT sockets. Native tracebacks: Debian's Python 3.11.2 has a bug in `ast` (fixed in a
  # later 3.11 release) that can crash pytest's own failure formatting with an INTERNALERROR.
  log "unit tests in the image"
  buildah run --isolation chroot --user 0:0 --cap-add CAP_NET_ADMIN --cap-add CAP_NET_RAW \
    --workingdir /src "$container" -- \
    python -m pytest -q -p no:cacheprovider --tb=native tests/unit
}

install_tools
phase "tools ready"
ensure_base_image
phase "base image $BASE_IMAGE ready"
build_image
phase "image $IMAGE built"
check_image
phase "image checked"
log "done: $IMAGE"
