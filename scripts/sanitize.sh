#!/usr/bin/env bash
# Runs the tests under a memory checker; any report fails the run.
#
#   scripts/sanitize.sh                      AddressSanitizer + LeakSanitizer (the default):
#                                            the unit tests and every tests/*.rs except
#                                            tests/example_*.rs
#   scripts/sanitize.sh asan faults model    ASan on these test targets only
#   scripts/sanitize.sh valgrind [TARGET..]  valgrind memcheck on the debug test binaries
#                                            (default targets: faults model free close)
#
# ASan mode needs the nightly toolchain with rust-src (installed here if missing:
# `rustup toolchain install nightly --profile minimal --component rust-src`), and builds std
# itself with the sanitizer (-Zbuild-std) into target/sanitize, apart from the normal build.
# On a 2-core machine: about 3.5 minutes from scratch (115 s to build, 100 s to run), 90 s
# when only tests changed. LeakSanitizer runs at the exit of every test process (the scale
# tests' client processes included) and fails it on a leak.
#
# tests/example_*.rs are left out of ASan mode: they build the examples with a plain
# `cargo build`, which cannot take the sanitizer flags (they would reach the host build
# scripts and proc macros). The examples' own code is the library's, which the rest covers.
#
# Valgrind mode runs each binary with --test-threads=1 (memcheck serialises threads anyway)
# and counts definite and indirect leaks as errors; "possibly lost" blocks are libtest's own
# thread handles. It is about 35 times slower than a native run (the default four targets:
# 95 s; tests/faults.rs alone 43 s), so it is for spot checks, not CI.
#
# Both modes set PROACTOR_SANITIZER=1: the tests then skip their memory bounds (RSS, heap
# in use) and relax timing upper bounds, which mean nothing under a checker. Every
# correctness check stays.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-asan}
[ $# -gt 0 ] && shift
export PROACTOR_SANITIZER=1
# No Rust backtraces: the tests that make a decoder or the poller panic on purpose would
# print one from the poller thread, and symbolizing it in a sanitized debug build is slow (a
# test waiting for that thread once timed out on a busy machine). The sanitizer's own
# reports carry their stacks.
export RUST_BACKTRACE=0
start=$(date +%s)

targets=()
if [ $# -gt 0 ]; then
  for t in "$@"; do targets+=(--test "$t"); done
fi

case "$mode" in
asan)
  if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    echo "==> installing the nightly toolchain with rust-src"
    rustup toolchain install nightly --profile minimal --component rust-src
  fi
  host=$(rustc -vV | sed -n 's/^host: //p')
  if [ ${#targets[@]} -eq 0 ]; then
    targets=(--lib)
    for f in tests/*.rs; do
      name=$(basename "$f" .rs)
      case "$name" in
      example_*) ;;
      *) targets+=(--test "$name") ;;
      esac
    done
  fi
  export RUSTFLAGS="-Zsanitizer=address"
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1"
  echo "==> AddressSanitizer + LeakSanitizer on $host: ${targets[*]}"
  log=$(mktemp)
  set +e
  # (With the `tls` feature, so that tests/tls.rs runs too; ring's C is not instrumented.)
  cargo +nightly test -Zbuild-std --target "$host" --target-dir target/sanitize \
    --features tls --no-fail-fast "${targets[@]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if grep -q -E 'ERROR: (Address|Leak)Sanitizer' "$log"; then
    echo "==> sanitizer reports found"
    rc=1
  fi
  rm -f "$log"
  ;;
valgrind)
  command -v valgrind >/dev/null || { echo "valgrind is not installed"; exit 1; }
  if [ ${#targets[@]} -eq 0 ]; then
    targets=(--test faults --test model --test free --test close)
  fi
  echo "==> building ${targets[*]}"
  mapfile -t exes < <(cargo test --no-run --message-format=json "${targets[@]}" |
    grep '"executable":"' | sed 's/.*"executable":"\([^"]*\)".*/\1/')
  rc=0
  for exe in "${exes[@]}"; do
    echo "==> valgrind $(basename "$exe")"
    if ! valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect \
      --show-leak-kinds=definite,indirect --error-exitcode=99 \
      "$exe" --test-threads=1; then
      rc=1
    fi
  done
  ;;
*)
  echo "usage: $0 [asan|valgrind] [TEST_TARGET...]" >&2
  exit 2
  ;;
esac

echo "==> $mode: exit $rc after $(($(date +%s) - start)) s"
exit "$rc"
