# Sourced by the commands in bin/: makes sure ./.venv exists and matches
# pyproject.toml, creating or updating it when it does not. Nothing else on
# the machine is touched.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
stamp="$venv/.installed-from"

pick_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "qbo-broker needs Python 3.11 or newer on PATH (or PYTHON=/path/to/python)." >&2
    return 1
}

wanted="$(sha256sum "$repo_root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    python="$(pick_python)"
    echo "Setting up $venv with $python (first run or pyproject.toml changed)..." >&2
    log="$(mktemp)"
    if ! { [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"; } >"$log" 2>&1 ||
        ! "$venv/bin/python" -m pip install --disable-pip-version-check -e "$repo_root[dev]" >>"$log" 2>&1; then
        cat "$log" >&2
        echo "Setting up $venv failed (output above)." >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
    echo "$wanted" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
