#!/usr/bin/env bash
# Unpacks Debian packages under .tools/NAME (nothing installed, no service started) and
# prints the path of one program from them.
#
#   tools/debian-tool.sh NAME PROGRAM PACKAGE...
#       NAME     the folder under .tools
#       PROGRAM  the program's path inside the packages, e.g. usr/bin/promtool
#       PACKAGE  the packages to unpack together (a program's libraries the machine may
#                lack come along: they land in NAME/usr/lib/<triplet>, see LD_LIBRARY_PATH)
#
# The first run fetches the .debs with `apt-get download` and unpacks them with
# `dpkg-deb -x`; later runs only check that PROGRAM is there. Nothing outside the
# repository is written (but the apt index, refreshed with `apt-get update` only when the
# download fails for lack of a usable index). Diagnostics go to stderr; stdout is only the
# path.
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: $0 NAME PROGRAM PACKAGE..." >&2
    exit 2
fi
name="$1" program="$2"
shift 2
packages=("$@")

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo_root/.tools/$name"
wanted="$dest/$program"

if [ -x "$wanted" ]; then
    echo "$wanted"
    exit 0
fi

mkdir -p "$repo_root/.tools"
# Two runs at once (e.g. parallel tests) must not unpack over each other.
exec 9>"$repo_root/.tools/$name.lock"
flock 9
if [ -x "$wanted" ]; then
    echo "$wanted"
    exit 0
fi

# Unpacked beside its destination, so the final move is a rename.
work="$(mktemp -d "$repo_root/.tools/$name.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# apt drops to the _apt user to download; let it write into the temp dir.
chmod 0755 "$work"
mkdir "$work/deb"
chmod 0777 "$work/deb"

download() {
    (cd "$work/deb" && apt-get download "${packages[@]}") >"$work/apt.log" 2>&1
}

echo "fetching Debian's ${packages[*]} into $dest ..." >&2
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
            echo "apt-get download ${packages[*]} failed" >&2
            exit 1
        }
    else
        cat "$work/apt.log" >&2
        echo "apt-get download ${packages[*]} failed" >&2
        exit 1
    fi
fi

for package in "${packages[@]}"; do
    debs=("$work"/deb/"${package}"_*.deb)
    if [ ! -f "${debs[0]}" ]; then
        echo "apt-get download left no ${package}_*.deb" >&2
        exit 1
    fi
    dpkg-deb -x "${debs[0]}" "$work/root"
    echo "unpacked ${debs[0]##*/}" >&2
done
if [ ! -x "$work/root/$program" ]; then
    echo "${packages[*]} hold no $program" >&2
    exit 1
fi
rm -rf "$dest"
mv "$work/root" "$dest"
# The unpacked tree is readable by all: tests run some programs (PostgreSQL's neighbours)
# as an unprivileged user.
chmod 0755 "$dest"
echo "$wanted"
