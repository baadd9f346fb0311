#!/usr/bin/env bash
# Builds Braid and starts a complete local network on 127.0.0.1 (ops/testbed.toml): set
# reflectors, edges in both port-parity sets, two entry points, a capture with its
# built-in test source, and clients, with a live table of every node. Ctrl-C stops it and
# every child. `ops/start.sh --duration 20` ends by itself with a summary (exit 0 when
# every client got the stream without a gap). Other flags: see `--help`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/braid-testbed --config ops/testbed.toml "$@"
