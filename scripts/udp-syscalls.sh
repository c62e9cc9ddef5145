#!/usr/bin/env bash
# System calls of a UDP echo server under the UDP bench's load (benches/udp/), to count how
# many datagrams each recvmmsg and sendmmsg carries. Runs the bench for one server at a time
# (8 s), attaches `perf stat` to the server process for 4 s of it, prints the counts and the
# bench's datagrams per second. Needs perf and tracepoint access (root, or
# kernel.perf_event_paranoid <= -1). The tracepoints slow every server: compare the batch
# sizes, not the rates.
#
#   scripts/udp-syscalls.sh SIZE SERVER...     e.g. scripts/udp-syscalls.sh 64 proactor-epoll mmsg
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:?size in bytes}; shift
cargo bench --no-run --bench udp 2>/dev/null
bin=$(cargo bench --no-run --bench udp --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*udp-[^"]*\)".*/\1/p' | tail -1)
events='syscalls:sys_enter_recvmmsg,syscalls:sys_enter_sendmmsg,syscalls:sys_enter_epoll_wait'
events+=',syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto'
events+=',raw_syscalls:sys_enter'
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for s in "$@"; do
  "$bin" --bench --servers "$s" --sizes "$size" --reps 1 --secs 8 --retries 0 \
    --max-others 100 --out "$out" > "$out/$s.txt" 2>&1 &
  bench=$!
  pid=
  for _ in $(seq 50); do
    pid=$(pgrep -f -- '--addr 127.0.0.1:0' | head -1 || true)
    [ -n "$pid" ] && break
    sleep 0.1
  done
  [ -n "$pid" ] || { echo "no server process for $s" >&2; kill "$bench"; exit 1; }
  sleep 1.5 # the windows filled and the warm-up over
  perf stat -x, -e "$events" -p "$pid" -- sleep 4 2> "$out/$s.perf"
  wait "$bench"
  echo "== $s, $size B: system calls over 4 s"
  awk -F, '{ printf "%-40s %s\n", $3, $1 }' "$out/$s.perf"
  grep -E '^\| [0-9]+ B \| datagrams/s' "$out/$s.txt" | head -1
done
