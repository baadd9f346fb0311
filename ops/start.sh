#!/usr/bin/env bash
# Builds Braid and starts a complete local network on 127.0.0.1: control server, two
# entry points, three set reflectors, edges in both port-parity sets, a capture with a
# built-in test source, and a client.
#
# The daemons do not exist yet (see README, "State"): until the data-path and viewers
# issues land, this builds the workspace, runs the core's own checks, and says what it
# will start. It exits non-zero on a build failure.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace
cat <<'TXT'

Braid built. The local network this command will start, once the daemons exist:

  capture (synthetic 4 Mbps MPEG-TS test source)
    -> entrypoint A, entrypoint B
    -> set reflectors 1, 2, 3          (every entry point to every set reflector)
    -> edges: 2 in the even-port set, 2 in the odd-port set
    -> client (primary edge + secondary set from the control server)
  control server: status page and API on 127.0.0.1

Today only braid-core is built: run `ops/test.sh` to exercise it.
TXT
