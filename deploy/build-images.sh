#!/usr/bin/env bash
# Build NovelCrafter's container images: what `make images` (all) and `make images-cpu` run.
#
#   deploy/build-images.sh [SERVICE...]     default: every service in the table below
#   deploy/build-images.sh --base           print the Python base it builds on (made if needed)
#
# Settings (environment):
#   PYTHON_IMAGE     the Python 3.11 base of every image. Default: the Dockerfiles' own
#                    (python:3.11.14-slim-bookworm); where it can be neither found nor pulled,
#                    a base built here from Debian packages (deploy/base-image.sh, needs root).
#   TORCH_INDEX_URL  where the CPU images' torch==2.13.0 comes from. Default: PyTorch's CPU
#                    index; where that cannot be reached, PyPI, with the wheel the host's pip
#                    resolves torch==2.13.0 to copied into deploy/wheels/ (it must be a +cpu build).
#   TORCH_GPU_INDEX_URL  the same for trainer-gpu. Default: PyTorch's cu130 index, else PyPI
#                    (whose torch==2.13.0 is the CUDA 13.0 build).
#   TAG              image tag (default: latest).
set -euo pipefail
cd "$(dirname "$0")/.."

# service        Dockerfile                        image
IMAGES="
ingest           services/ingest/Dockerfile        novelcrafter/ingest
trainer          services/trainer/Dockerfile.cpu   novelcrafter/trainer
inference        services/inference/Dockerfile     novelcrafter/inference
console          services/console/Dockerfile       novelcrafter/console
postgres         deploy/docker/postgres.Dockerfile novelcrafter/postgres
trainer-gpu      services/trainer/Dockerfile.gpu   novelcrafter/trainer-gpu
"
LOCAL_BASE=novelcrafter/python-base:3.11-bookworm
TAG=${TAG:-latest}

fail() { echo "error: $*" >&2; exit 1; }
note() { echo "build-images: $*"; }
command -v docker >/dev/null || fail "docker not found: building the images needs a Docker engine"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (is dockerd running, and may this user use it?)"

host_python() {
    if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo "${PYTHON:-python3}"; fi
}

reachable() {
    "$(host_python)" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$1" \
        >/dev/null 2>&1
}

python_base() {
    if [ -n "${PYTHON_IMAGE:-}" ]; then return; fi
    PYTHON_IMAGE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' services/ingest/Dockerfile)
    if docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1 || docker pull -q "$PYTHON_IMAGE" >/dev/null 2>&1; then
        return
    fi
    note "cannot pull $PYTHON_IMAGE: using a Python 3.11 base built from Debian packages ($LOCAL_BASE)"
    PYTHON_IMAGE=$LOCAL_BASE
    docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1 || deploy/base-image.sh "$PYTHON_IMAGE"
}

torch_cpu_source() {
    rm -f deploy/wheels/*.whl
    if [ -n "${TORCH_INDEX_URL:-}" ]; then return; fi
    if reachable https://download.pytorch.org/whl/cpu/torch/; then
        TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
        return
    fi
    note "PyTorch's CPU index is out of reach: torch from the wheel the host's pip resolves"
    "$(host_python)" -m pip download --quiet --no-deps --only-binary=:all: --dest deploy/wheels torch==2.13.0 \
        || fail "the host's pip could not get torch==2.13.0; set TORCH_INDEX_URL to an index with the CPU build"
    local wheel
    wheel=$(ls deploy/wheels/torch-*.whl)
    case "$wheel" in
        *+cpu-*) note "torch: $wheel" ;;
        *) rm -f deploy/wheels/*.whl
           fail "the host's pip resolves torch==2.13.0 to $(basename "$wheel"), not a CPU build; set TORCH_INDEX_URL" ;;
    esac
    TORCH_INDEX_URL=https://pypi.org/simple
}

torch_gpu_source() {
    if [ -n "${TORCH_GPU_INDEX_URL:-}" ]; then return; fi
    TORCH_GPU_INDEX_URL=https://download.pytorch.org/whl/cu130
    reachable "$TORCH_GPU_INDEX_URL/torch/" || TORCH_GPU_INDEX_URL=https://pypi.org/simple
}

if [ "${1:-}" = --base ]; then
    python_base >&2
    echo "$PYTHON_IMAGE"
    exit 0
fi

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || mapfile -t wanted < <(awk 'NF == 3 {print $1}' <<<"$IMAGES")
for service in "${wanted[@]}"; do
    grep -qE "^$service +" <<<"$IMAGES" || fail "unknown service $service (one of: $(awk 'NF == 3 {printf "%s ", $1}' <<<"$IMAGES"))"
done

python_base
for service in "${wanted[@]}"; do
    read -r _ dockerfile image < <(grep -E "^$service +" <<<"$IMAGES")
    args=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
    if grep -q '^ARG TORCH_INDEX_URL=.*/cu' "$dockerfile"; then
        torch_gpu_source
        args+=(--build-arg "TORCH_INDEX_URL=$TORCH_GPU_INDEX_URL")
    elif grep -q '^ARG TORCH_INDEX_URL=' "$dockerfile"; then
        [ -n "${torch_cpu_done:-}" ] || { torch_cpu_source; torch_cpu_done=1; }
        args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    fi
    note "$image:$TAG from $dockerfile (base $PYTHON_IMAGE)"
    started=$SECONDS
    docker build "${args[@]}" -f "$dockerfile" -t "$image:$TAG" .
    size=$(docker image inspect -f '{{.Size}}' "$image:$TAG")
    note "$image:$TAG built in $((SECONDS - started)) s, $((size / 1000000)) MB"
done
rm -f deploy/wheels/*.whl
