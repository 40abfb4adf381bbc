#!/usr/bin/env bash
# What mutual TLS costs one `venomctl` call: N × `venomctl waves` against a plaintext and a
# TLS dev cluster (`venomctl dev` and `venomctl dev --tls`), side by side, three rounds.
# Each call is a new process: start, load the certificate, connect (TLS: handshake with a
# client certificate), one RPC, exit. Usage: scripts/tls-call-cost.sh [N] (default 100),
# after `cargo build --release -p venomctl`.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${VENOMCTL:-target/release/venomctl}
N=${1:-100}
D=$(mktemp -d)
trap 'kill $P1 $P2 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
RUST_LOG=error "$V" dev --listen 127.0.0.1:0 --data-dir "$D/plain" >"$D/plain.out" 2>&1 &
P1=$!
RUST_LOG=error "$V" dev --tls --listen 127.0.0.1:0 --data-dir "$D/tls" >"$D/tls.out" 2>&1 &
P2=$!
url() { # the coordinator URL `venomctl dev` prints
  for _ in $(seq 100); do
    u=$(grep -o 'coordinator  [^ ]*' "$1" | awk '{print $2}' || true)
    [ -n "$u" ] && { echo "$u"; return; }
    sleep 0.1
  done
  echo "no dev cluster came up ($1)" >&2; exit 1
}
PLAIN=$(url "$D/plain.out")
TLS=$(url "$D/tls.out")
run() { local s e; s=$(date +%s%N); for _ in $(seq "$N"); do "$@" waves >/dev/null; done; e=$(date +%s%N); echo $(( (e - s) / N / 1000 )); }
for round in 1 2 3; do
  plain=$(run "$V" --coordinator "$PLAIN")
  tls=$(run env VENOM_TLS_CA="$D/tls/tls/ca.pem" VENOM_TLS_CERT="$D/tls/tls/admin-dev.pem" \
    VENOM_TLS_KEY="$D/tls/tls/admin-dev-key.pem" "$V" --coordinator "$TLS")
  echo "round $round: plaintext ${plain} µs per call, mutual TLS ${tls} µs per call (mean of $N)"
done
