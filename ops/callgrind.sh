#!/usr/bin/env bash
# Instructions the edge spends per packet it delivers (issue 16): the sans-IO edge of
# reflector/examples/edge-instructions.rs under callgrind, counting only the edge's
# handle_input, handle_timeout and poll_output, at two stream lengths; the difference in
# instructions over the difference in packets delivered leaves joining out. Stable on a
# noisy machine, unlike time: run it before and after a change to the per-packet path.
#
#   ops/callgrind.sh [viewers] [short] [long]     (defaults 100 1000 3000)
set -euo pipefail
cd "$(dirname "$0")/.."
viewers=${1:-100}
short=${2:-1000}
long=${3:-3000}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
cargo build -q --release -p braid-reflector --example edge-instructions
bin=target/release/examples/edge-instructions
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() {
    local n=$1
    local line
    line=$(valgrind --tool=callgrind --callgrind-out-file="$out/cg.$n" \
        --toggle-collect='braid_reflector::edge::Edge::handle_input' \
        --toggle-collect='braid_reflector::edge::Edge::handle_timeout' \
        --toggle-collect='braid_reflector::edge::Edge::poll_output' \
        "$bin" "$viewers" "$n" 2>"$out/log.$n")
    local delivered ir
    delivered=$(sed -n 's/.* delivered \([0-9]*\) .*/\1/p' <<<"$line")
    ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out/log.$n")
    echo "$delivered $ir"
}
read -r d1 i1 < <(run "$short")
read -r d2 i2 < <(run "$long")
per=$(( (i2 - i1) / (d2 - d1) ))
echo "viewers $viewers: $short packets: $i1 instructions, $d1 delivered; $long packets: $i2, $d2"
echo "edge instructions per packet delivered: $per"
