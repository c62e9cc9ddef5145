#!/usr/bin/env bash
# The TLS bench (benches/tls/, issue 20 item 5): proactor's TLS (rustls driven by the poller)
# on io_uring and on epoll against tokio-rustls, same certificate, TLS 1.3 and
# TLS13_AES_128_GCM_SHA256 on both sides: a 64 KiB stream (MB/s), 1,000 connections echoing
# 4 KiB (round trips/s, p99, idle memory per connection) and full handshakes per second;
# server pinned to CPU 0, load generator to CPU 1, every echo checked. Builds the bench (with
# the `tls` feature), records the machine, runs it. Hold the bench lock around it on a
# shared machine: `flock /tmp/proactor-bench.lock scripts/tls-bench.sh`.
#
#   scripts/tls-bench.sh                  full run: 3 cases x 3 servers x 3 reps (~3 min)
#   scripts/tls-bench.sh --quick          smoke run, under a minute; figures are noise
#   scripts/tls-bench.sh --cases echo --servers proactor-uring,tokio-rustls   (any bench argument)
#
# Bench arguments (see benches/tls/main.rs): --cases stream,echo,handshake --servers NAME,...
# --reps N --secs S --warm S --stream-mib N --conns N --size BYTES --inflight N
# --max-others PCT --retries N --out DIR --quick. Environment: PROACTOR_BENCH_PIN=0 (no
# pinning), PROACTOR_BENCH_SERVER_CPU / PROACTOR_BENCH_CLIENT_CPU (0 and 1),
# PROACTOR_BENCH_ACCEPTS (1: accepts the proactor servers keep outstanding). Writes
# target/bench/tls.md, tls.csv, tls_raw.csv, tls.txt and tls-machine.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
  esac
done

# 1,000 connections and their listener, with room to spare.
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 4096 ]; then
  ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi

TARGET="${CARGO_TARGET_DIR:-target}"
OUT="$TARGET/bench"
mkdir -p "$OUT"
START=$(date +%s)

{
  scripts/machine.sh
  echo "rustls: $(grep -A1 '^name = "rustls"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')," \
    "tokio-rustls: $(grep -A1 '^name = "tokio-rustls"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')," \
    "tokio: $(grep -A1 '^name = "tokio"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')"
} | tee "$OUT/tls-machine.txt"

cargo bench --features tls --no-run --bench tls
cargo bench --features tls --bench tls -- "$@" 2>&1 | tee "$OUT/tls.txt"
echo "tls-bench: done in $(( $(date +%s) - START )) s"
