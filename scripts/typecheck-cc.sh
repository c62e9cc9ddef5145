#!/bin/sh
# A stand-in C compiler for type-checking a target this machine has no C toolchain for:
# `cargo check --target x86_64-apple-darwin --all-features` runs ring's build script (the `tls`
# feature's crypto provider), which compiles C and assembly for macOS; here that needs Apple's
# SDK. `cargo check` never links, so empty objects are enough: this writes an empty file where
# `-o` says and nothing else. Used as CC_x86_64_apple_darwin by .ci/run and
# scripts/deps-check.sh, for the macOS check only; never for a build that runs.
# (Asked to preprocess, it says "clang", so that the cc crate passes clang's flags.)
out=
while [ $# -gt 0 ]; do
  case "$1" in
  -E) echo clang; exit 0 ;;
  -o) out=$2; shift ;;
  -o* | -Fo*) out=${1#-?o} ;;
  esac
  shift
done
if [ -n "$out" ]; then : >"$out"; fi
