#!/usr/bin/env bash
# Makes Debian's Prometheus tools available under .tools/prometheus and prints a path.
#
#   tools/promtool.sh               print the path of promtool
#   tools/promtool.sh --prometheus  print the path of the prometheus server binary
#
# The `prometheus` package (bookworm: 2.42) holds both; tools/debian-tool.sh fetches and
# unpacks it the first time.
set -euo pipefail

case "${1:-}" in
    "") program=usr/bin/promtool ;;
    --prometheus) program=usr/bin/prometheus ;;
    *)
        echo "usage: $0 [--prometheus]" >&2
        exit 2
        ;;
esac
exec "$(dirname "${BASH_SOURCE[0]}")/debian-tool.sh" prometheus "$program" prometheus
