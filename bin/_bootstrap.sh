# shellcheck shell=bash
# Sourced by the commands in bin/: makes sure ./.venv exists and holds exactly what
# uv.lock says (the project, its dev extra and the embedded database), creating or
# syncing it when pyproject.toml or uv.lock changed. uv itself lives in ./.tools/uv.
# Nothing else on the machine is touched.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
stamp="$venv/.installed-from"
UV_VERSION=0.13.9
uv="$repo_root/.tools/uv/bin/uv"

pick_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "qbo-broker needs Python 3.11 or newer on PATH (or PYTHON=/path/to/python)." >&2
    return 1
}

wanted="$(cat "$repo_root/pyproject.toml" "$repo_root/uv.lock" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    python="$(pick_python)"
    echo "Setting up $venv with $python from uv.lock (first run or the lock changed)..." >&2
    log="$(mktemp)"
    if ! {
        if [ ! -x "$uv" ] || [ "$("$uv" --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
            "$python" -m venv "$repo_root/.tools/uv" &&
                "$repo_root/.tools/uv/bin/pip" install --disable-pip-version-check "uv==$UV_VERSION"
        fi &&
            UV_PROJECT_ENVIRONMENT="$venv" "$uv" sync --locked --extra dev --python "$python" \
                --project "$repo_root"
    } >"$log" 2>&1; then
        cat "$log" >&2
        echo "Setting up $venv failed (output above)." >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
    echo "$wanted" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
