#!/usr/bin/env bash
# The UDP echo bench (benches/udp/, issue 18): proactor on io_uring and on epoll against a
# tokio recv_from/send_to loop, a blocking std loop and a hand-written recvmmsg/sendmmsg loop,
# 64 B and 1,200 B datagrams, server pinned to CPU 0, every echo checked. Builds the bench,
# records the machine, runs it.
#
#   scripts/udp-bench.sh                  full run: 2 sizes x 9 servers x 5 reps of 3 s (~8 min)
#   scripts/udp-bench.sh --quick          smoke run, well under a minute; figures are noise
#   scripts/udp-bench.sh --servers proactor-uring,tokio --sizes 64 --reps 3   (any bench argument)
#
# Bench arguments (see benches/udp/main.rs): --sizes 64,1200 --servers NAME,... --reps N
# --secs S --warm S --sockets N --window N --rcvbuf BYTES --max-others PCT --retries N
# --out DIR --quick. Environment: PROACTOR_BENCH_PIN=0 (no pinning),
# PROACTOR_BENCH_SERVER_CPU / PROACTOR_BENCH_CLIENT_CPU (0 and 1), PROACTOR_BENCH_UDP_READS
# (64). Writes target/bench/udp.md, udp.csv, udp_raw.csv, udp.txt and udp-machine.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
  esac
done

TARGET="${CARGO_TARGET_DIR:-target}"
OUT="$TARGET/bench"
mkdir -p "$OUT"
START=$(date +%s)

{
  scripts/machine.sh
  echo "net.core.rmem_max: $(cat /proc/sys/net/core/rmem_max 2>/dev/null || echo ?)"
  echo "net.core.rmem_default: $(cat /proc/sys/net/core/rmem_default 2>/dev/null || echo ?)"
} | tee "$OUT/udp-machine.txt"

cargo bench --no-run --bench udp
cargo bench --bench udp -- "$@" 2>&1 | tee "$OUT/udp.txt"
echo "udp-bench: done in $(( $(date +%s) - START )) s"
