#!/usr/bin/env bash
# Build the moga_dist image without any image registry (docker/README.md).
#   docker/build.sh                              CPU image moga-dist:cpu, run as root (debootstrap):
#                                                base = debootstrap'd Debian bookworm, imported once;
#                                                Python packages = a wheelhouse built here (pip wheel).
#   BASE_IMAGE=nvcr.io/nvidia/pytorch:25.08-py3 IMAGE=moga-dist:latest docker/build.sh    GPU image
# Knobs: IMAGE, BASE_IMAGE, DEBIAN_MIRROR (default: this machine's apt mirror), PYTHON (builds the
# wheelhouse; default .venv/bin/python), DOCKER (the client), WHEELS_ONLY (default 1 for CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE=${BASE_IMAGE:-}
DOCKER=${DOCKER:-docker}
DEBIAN_BASE=${DEBIAN_BASE:-moga-debian:bookworm}
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
WHEELS=docker/wheels

die() { echo "docker/build.sh: $*" >&2; exit 2; }

# The first deb URI that apt on this machine uses (one-line or deb822 sources).
host_mirror() {
  sed -n -E 's/^deb +(\[[^]]*\] +)?(https?:[^ ]+) +bookworm .*/\2/p; s/^URIs: +(https?:[^ ]+debian\/?)$/\1/p' \
    /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | grep -v -- -security | head -n 1
}

# A Debian bookworm image from the distribution's own packages: debootstrap, then docker import.
debian_base() {
  if "$DOCKER" image inspect "$DEBIAN_BASE" >/dev/null 2>&1; then return; fi
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap), or set BASE_IMAGE"
  [[ $(id -u) == 0 ]] || die "debootstrap needs root; run as root or set BASE_IMAGE"
  local mirror=${DEBIAN_MIRROR:-$(host_mirror)} root
  [[ -n "$mirror" ]] || die "no Debian mirror found in /etc/apt/sources.list*; set DEBIAN_MIRROR"
  root=$(mktemp -d)
  chmod 755 "$root"             # it becomes the image's /: mktemp's 0700 would lock out the non-root user
  trap 'rm -rf "$root"' RETURN
  echo "== debootstrap bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$root" "$mirror" > "$root.log" 2>&1 || { tail -20 "$root.log"; die "debootstrap failed"; }
  rm -f "$root.log"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "$DOCKER" import --change 'CMD ["bash"]' - "$DEBIAN_BASE" >/dev/null
}

# Every Python package the image installs, as wheels for this machine's Python (= the image's).
wheelhouse() {
  local have
  have=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  # The image installs python3 from bookworm: 3.11, so the wheels must be cp311 ones.
  [[ "$have" == "3.11" ]] || die "PYTHON=$PYTHON is Python $have; the bookworm image needs 3.11 wheels"
  echo "== wheelhouse $WHEELS (pip wheel with $PYTHON)"
  find "$WHEELS" -name '*.whl' -delete
  "$PYTHON" -m pip wheel -q -w "$WHEELS" -c constraints.txt '.[deepspeed,megatron,train]' 'setuptools>=68'
  rm -f "$WHEELS"/moga_dist-*.whl
}

start=$SECONDS
if [[ -z "$BASE_IMAGE" ]]; then
  IMAGE=${IMAGE:-moga-dist:cpu}
  WHEELS_ONLY=${WHEELS_ONLY:-1}
  debian_base
  wheelhouse
  BASE_IMAGE=$DEBIAN_BASE
else
  IMAGE=${IMAGE:-moga-dist:latest}
  WHEELS_ONLY=${WHEELS_ONLY:-}
fi
echo "== docker build $IMAGE from $BASE_IMAGE (wheels only: ${WHEELS_ONLY:-no})"
# BuildKit: buildx where the client has it; clients before 23.0 (Debian's 20.10) have it built in.
if "$DOCKER" buildx version >/dev/null 2>&1; then build=(buildx build --load); else build=(build); fi
DOCKER_BUILDKIT=1 "$DOCKER" "${build[@]}" --network host --progress plain -f docker/Dockerfile \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg WHEELS_ONLY="$WHEELS_ONLY" -t "$IMAGE" .
size=$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE")
echo "== built $IMAGE in $((SECONDS - start)) s, $((size / 1000000)) MB"
