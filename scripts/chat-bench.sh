#!/usr/bin/env bash
# The chat bench (benches/chat/): chat-server against two tokio chat servers, side by side,
# every delivery checked. Builds what it needs, records the machine, runs the bench.
#
#   scripts/chat-bench.sh                       full run: 4 cases x 3 servers x 3 reps
#   scripts/chat-bench.sh --quick               smoke run, well under a minute; figures are noise
#   scripts/chat-bench.sh --cases trickle --quickack --reps 5   (any of the bench's arguments)
#
# Bench arguments (see benches/chat/main.rs): --cases burst100,burst1000,join1000,trickle
# --servers chat-server,tokio-batch,tokio-naive --reps N --quick --quickack --max-others PCT
# --retries N --out DIR --server NAME=COMMAND. Environment: PROACTOR_BENCH_PIN=0 (no pinning),
# PROACTOR_BENCH_SERVER_CPU / PROACTOR_BENCH_CLIENT_CPU (0 and 1).
# Writes target/bench/chat.md, chat.csv, chat_raw.csv, chat.txt and chat-machine.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
  esac
done

TARGET="${CARGO_TARGET_DIR:-target}"
OUT="$TARGET/bench"
mkdir -p "$OUT"
START=$(date +%s)

{
  scripts/machine.sh
} | tee "$OUT/chat-machine.txt"
# 1,000 clients: about 1,000 descriptors in the load generator and as many in the server.
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 4096 ]; then
  ulimit -n 4096 2>/dev/null || echo "warning: fd limit $(ulimit -n): the 1,000-client cases will fail"
fi

cargo build --release --example chat-server
cargo bench --no-run --bench chat
cargo bench --bench chat -- "$@" 2>&1 | tee "$OUT/chat.txt"
echo "chat-bench: done in $(( $(date +%s) - START )) s"
