#!/usr/bin/env bash
# Runs the whole test suite, every cargo feature on (`uring`, `tls`: tests/tls.rs and
# tests/example_chat_tls.rs need it), once per engine this machine has:
# first as built (`auto`: io_uring where the kernel allows it, else epoll), then on epoll
# (`PROACTOR_ENGINE=epoll`). On macOS and the BSDs there is one engine, kqueue: one run.
#
#   scripts/test.sh [ARGS FOR cargo test...]     e.g. scripts/test.sh --test model
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
  echo "==> cargo test --all-features $* (PROACTOR_ENGINE=${PROACTOR_ENGINE:-unset})"
  cargo test --all-features "$@"
}

case "$(uname -s)" in
Linux)
  PROACTOR_ENGINE=auto run "$@"
  PROACTOR_ENGINE=epoll run "$@"
  ;;
*)
  run "$@"
  ;;
esac
