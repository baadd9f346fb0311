#!/bin/bash
# The edge's CPU per viewer with and without adaptation, measured in the same run:
# N viewers (braid-client processes) on loopback watch a ladder of three synthetic
# renditions (0.5, 1, 2 Mbit/s) through one edge started with --ladder (adaptation:
# speed meters, chooser, probes), then the same N watch the 2 Mbit/s rendition through
# an edge without it. The edge's CPU (user + system, from /proc) is measured over the last
# SECONDS of each run.
#
#   ops/bench-adaptation.sh [N=20] [SECONDS=30] [BIN=target/release]
set -euo pipefail
N=${1:-20}; SECS=${2:-30}; B=$(realpath "${3:-target/release}")
D=$(mktemp -d /tmp/braid-bench-adapt-XXXXXX)
export BRAID_NETWORK_KEY="bench network key"; K=bench-key
PIDS=()
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap 'stop; rm -rf "$D"' EXIT
# CPU seconds of process $1 (user + system clock ticks, 100 a second).
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
run() { # $1: "ladder" or "plain"
    local mode=$1 S="127.0.0.1:19150,127.0.0.1:19151"
    "$B/braid-entrypoint" --listen 127.0.0.1:19051 --stream 21:$K:$S --stream 22:$K:$S --stream 23:$K:$S 2>"$D/entry.log" >/dev/null & PIDS+=($!)
    for p in 19150 19151; do "$B/braid-reflector" --role set --listen 127.0.0.1:$p 2>"$D/set$p.log" >/dev/null & PIDS+=($!); done
    local extra=(); [ "$mode" = ladder ] && extra=(--ladder 21:500,22:1000,23:2000)
    "$B/braid-reflector" --role edge --listen 127.0.0.1:19250 --reflector 127.0.0.1:19150 --reflector 127.0.0.1:19151 "${extra[@]}" 2>"$D/edge.log" >/dev/null & PIDS+=($!)
    local edge=$!
    sleep 1
    for r in "21 500000" "22 1000000" "23 2000000"; do set -- $r
        "$B/braid-capture" --stream $1 --stream-key $K --bitrate $2 --align --gop 25 --entry 127.0.0.1:19051 --duration $((SECS + 40)) 2>"$D/cap$1.log" >/dev/null & PIDS+=($!)
    done
    sleep 2
    local watch=21; [ "$mode" = plain ] && watch=23
    for i in $(seq 1 "$N"); do
        "$B/braid-client" --edge 127.0.0.1:19250 --stream $watch --id $i --out /dev/null --stats-json "$D/$mode$i.json" --duration $((SECS + 25)) 2>/dev/null & PIDS+=($!)
    done
    sleep 20  # ladder viewers climb to the top; then measure
    local c0 t0 c1 t1; c0=$(cpu $edge); t0=$(date +%s.%N)
    sleep "$SECS"
    c1=$(cpu $edge); t1=$(date +%s.%N)
    local top=0 changes=0
    for i in $(seq 1 "$N"); do
        top=$((top + $(tail -1 "$D/$mode$i.json" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(1 if d.get("rendition",{}).get("index",2)==2 else 0)')))
    done
    stop
    python3 -c "c=($c1-$c0)/($t1-$t0); print(f'$mode: {c*100:.2f}% of a core for $N viewers, {c*100/$N:.3f}% per viewer ($top of $N on the 2 Mbit/s rendition)')"
    echo "$c1 $c0 $t1 $t0" > "$D/$mode.cpu"; echo "  (edge CPU seconds $c0 -> $c1)"
}
run ladder
run plain
python3 - "$D" <<'PY'
import sys
d=sys.argv[1]
def rate(m):
    c1,c0,t1,t0=map(float,open(f"{d}/{m}.cpu").read().split())
    return (c1-c0)/(t1-t0)
print(f"adaptation costs {rate('ladder')/rate('plain'):.2f}x the edge's CPU without it")
PY
