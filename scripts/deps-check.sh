#!/usr/bin/env bash
# Checks that the crate builds with what Cargo.toml declares, not only with the versions in
# Cargo.lock and the toolchain at hand:
#
#   1. minimal versions: every direct dependency at the oldest release its requirement
#      allows (`cargo +nightly update -Z direct-minimal-versions`), then
#      `cargo check --all-features --all-targets` with the default toolchain, and
#      `cargo check --all-features --lib` for the kqueue targets whose std is installed
#      (x86_64-unknown-freebsd, x86_64-apple-darwin: .ci/run adds them);
#   2. rust-version: the toolchain named by `rust-version` (installed here if missing,
#      `rustup toolchain install X --profile minimal`) runs `cargo check --all-features --lib`
#      against the minimal versions of step 1 and against the newest versions that declare
#      support for it (`CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback
#      cargo generate-lockfile`: the lockfile a user on that toolchain gets).
#
# Both run in a copy of the tree (without target/ and .git) in a temporary folder, removed at
# the end, so the repository's Cargo.lock is never touched. The builds go to
# target/deps-check/ (one folder per toolchain), so a rerun only rebuilds what changed.
# Indirect dependencies are resolved for rust-version in both steps, as a user's resolver
# would. The dev-dependencies are in the minimal resolve too, so their floors must build.
#
# When the nightly or the rust-version toolchain cannot be installed (no network to the Rust
# dist server), that part prints SKIPPED and the script goes on; any build failure fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target_root="${CARGO_TARGET_DIR:-$root/target}/deps-check"
unset CARGO_TARGET_DIR RUSTUP_TOOLCHAIN
start=$(date +%s)

say() { printf -- '--> %s\n' "$*"; }
run() { printf -- '$ %s\n' "$*"; "$@"; }
elapsed() { echo "$(($(date +%s) - start)) s"; }

# `have TOOLCHAIN`: installed, or installed now. Fails without network.
have() {
  rustup toolchain list | grep -q "^$1-" && return 0
  say "installing the $1 toolchain"
  rustup toolchain install "$1" --profile minimal
}

msrv=$(sed -n 's/^rust-version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -1)
[ -n "$msrv" ] || { echo "error: no rust-version in Cargo.toml" >&2; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/proactor-deps-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tar -C "$root" --exclude=./target --exclude=./.git -cf - . | tar -C "$tmp" -xf -
cd "$tmp"
say "copied the tree to $tmp; builds go to $target_root"

# What a resolver does for a user on rust-version: prefer releases that declare support for it.
export CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback
# The direct dependencies as resolved, one per line, for the log.
direct() { cargo tree --all-features --depth 1 -e normal,dev --prefix none | sed 1d | sort -u | sed 's/^/    /'; }

have_msrv=1
if ! have "$msrv"; then
  have_msrv=0
  echo "SKIPPED: toolchain $msrv (rust-version) unavailable; rust-version not checked"
fi

if have nightly; then
  say "minimal versions of the direct dependencies"
  run cargo +nightly update -Z direct-minimal-versions --quiet
  direct
  CARGO_TARGET_DIR=$target_root/stable run cargo check --all-features --all-targets --quiet
  installed=$(rustup target list --installed)
  for t in x86_64-unknown-freebsd x86_64-apple-darwin; do
    if grep -qx "$t" <<<"$installed"; then
      # (For macOS, ring's C is not compiled: see scripts/typecheck-cc.sh.)
      CC_x86_64_apple_darwin="$root/scripts/typecheck-cc.sh" \
        CARGO_TARGET_DIR=$target_root/stable run cargo check --all-features --lib --target "$t" --quiet
    else
      say "no std for $t installed (rustup target add $t); not checked"
    fi
  done
  if [ "$have_msrv" = 1 ]; then
    CARGO_TARGET_DIR=$target_root/msrv run cargo "+$msrv" check --all-features --lib --quiet
  fi
  say "minimal versions build ($(elapsed))"
else
  echo "SKIPPED: nightly toolchain unavailable; minimal versions not checked"
fi

if [ "$have_msrv" = 1 ]; then
  say "rust-version $msrv with the newest dependencies that support it"
  run cargo generate-lockfile --quiet
  direct
  CARGO_TARGET_DIR=$target_root/msrv run cargo "+$msrv" check --all-features --lib --quiet
  say "rust-version $msrv builds ($(elapsed))"
fi

say "deps-check done in $(elapsed)"
