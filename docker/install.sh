#!/bin/sh
# Installs qbo-token-broker into a virtualenv exactly as the image does; the Dockerfile
# and tests/test_image.py both run this script, so the test proves the image's steps.
#
#   docker/install.sh deps SRC VENV   create VENV; install the locked dependencies of
#                                     SRC/uv.lock (hash-checked, no resolver, wheels only)
#   docker/install.sh app  SRC VENV   build the wheel of SRC, install it without
#                                     dependencies, check the result, remove pip from VENV
#
# `deps` needs only SRC/pyproject.toml and SRC/uv.lock, so the image caches that layer
# until the lock changes. The optional extras (embedded = pgserver, progress = tqdm) are
# never installed. Environment: PYTHON (default python3) creates VENV; UV (default uv)
# exports the lock. Nothing is cached: PIP_NO_CACHE_DIR is forced on.
set -eu

usage() {
    echo "usage: $0 deps|app SRC VENV" >&2
    exit 64
}
[ "$#" -eq 3 ] || usage
step="$1"
src="$(cd "$2" && pwd)"
venv="$3"
python="${PYTHON:-python3}"
uv="${UV:-uv}"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

pip() {
    "$venv/bin/python" -m pip "$@"
}

case "$step" in
deps)
    [ -f "$src/uv.lock" ] || { echo "$src/uv.lock is missing" >&2; exit 1; }
    [ ! -e "$venv" ] || { echo "$venv already exists: deps creates it" >&2; exit 1; }
    "$python" -m venv "$venv"
    requirements="$venv/locked-requirements.txt"
    # The lock as a hashed requirements file: the project's runtime dependencies only
    # (no dev extra, no optional extras, not the project itself).
    "$uv" export --frozen --no-dev --no-emit-project --format requirements-txt \
        --project "$src" --output-file "$requirements" --quiet
    pip install --require-hashes --no-deps --only-binary=:all: -r "$requirements"
    rm -f "$requirements"
    ;;
app)
    [ -x "$venv/bin/python" ] || { echo "$venv is not a virtualenv: run deps first" >&2; exit 1; }
    wheels="$(mktemp -d)"
    trap 'rm -rf "$wheels"' EXIT
    pip wheel --no-deps --wheel-dir "$wheels" "$src"
    set -- "$wheels"/qbo_token_broker-*.whl
    if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
        echo "expected one wheel, got: $*" >&2
        exit 1
    fi
    pip install --no-deps --no-index "$1"
    # Every requirement of every installed distribution is installed (deps ran with
    # --no-deps: this is where a lock that misses something shows up).
    pip check
    for extra in pgserver tqdm; do
        if "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$extra') is None)"; then
            echo "$extra is installed, but the image must not carry it" >&2
            exit 1
        fi
    done
    "$venv/bin/qbo-broker" --version
    # Nothing installs packages at run time: pip and setuptools leave the virtualenv.
    pip uninstall --yes --quiet pip setuptools
    ;;
*)
    usage
    ;;
esac
