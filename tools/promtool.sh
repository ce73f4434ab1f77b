#!/usr/bin/env bash
# Makes Debian's Prometheus tools available under .tools/prometheus and prints a path.
#
#   tools/promtool.sh               print the path of promtool
#   tools/promtool.sh --prometheus  print the path of the prometheus server binary
#
# The first run fetches the `prometheus` .deb with `apt-get download` (bookworm: 2.42) and
# unpacks it with `dpkg-deb -x` into .tools/prometheus; nothing is installed, no service is
# started, nothing outside the repository is written (but the apt index, refreshed with
# `apt-get update` only when the download fails for lack of a usable index). Later runs only
# check that the binaries are there. Diagnostics go to stderr; stdout is only the path.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo_root/.tools/prometheus"
promtool="$dest/usr/bin/promtool"
prometheus="$dest/usr/bin/prometheus"

case "${1:-}" in
    "") wanted="$promtool" ;;
    --prometheus) wanted="$prometheus" ;;
    *)
        echo "usage: $0 [--prometheus]" >&2
        exit 2
        ;;
esac

if [ -x "$promtool" ] && [ -x "$prometheus" ]; then
    echo "$wanted"
    exit 0
fi

mkdir -p "$repo_root/.tools"
# Two runs at once (e.g. parallel tests) must not unpack over each other.
exec 9>"$repo_root/.tools/prometheus.lock"
flock 9
if [ -x "$promtool" ] && [ -x "$prometheus" ]; then
    echo "$wanted"
    exit 0
fi

# Unpacked beside its destination, so the final move is a rename.
work="$(mktemp -d "$repo_root/.tools/prometheus.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# apt drops to the _apt user to download; let it write into the temp dir.
chmod 0755 "$work"
mkdir "$work/deb"
chmod 0777 "$work/deb"

download() {
    (cd "$work/deb" && apt-get download prometheus) >"$work/apt.log" 2>&1
}

echo "fetching Debian's prometheus package into $dest ..." >&2
if ! download; then
    # No index yet (fresh machine) or a stale one (the mirror moved to a newer revision).
    if grep -qE "Unable to locate package|no installation candidate|Can't select candidate|404" \
        "$work/apt.log"; then
        echo "no usable apt index; running apt-get update" >&2
        apt-get update >"$work/update.log" 2>&1 || {
            cat "$work/update.log" >&2
            echo "apt-get update failed" >&2
            exit 1
        }
        download || {
            cat "$work/apt.log" >&2
            echo "apt-get download prometheus failed" >&2
            exit 1
        }
    else
        cat "$work/apt.log" >&2
        echo "apt-get download prometheus failed" >&2
        exit 1
    fi
fi

debs=("$work"/deb/prometheus_*.deb)
if [ ! -f "${debs[0]}" ]; then
    echo "apt-get download left no prometheus_*.deb" >&2
    exit 1
fi
dpkg-deb -x "${debs[0]}" "$work/root"
for binary in promtool prometheus; do
    if [ ! -x "$work/root/usr/bin/$binary" ]; then
        echo "${debs[0]##*/} has no usr/bin/$binary" >&2
        exit 1
    fi
done
rm -rf "$dest"
mv "$work/root" "$dest"
echo "unpacked ${debs[0]##*/}: $("$promtool" --version 2>&1 | head -n 1)" >&2
echo "$wanted"
