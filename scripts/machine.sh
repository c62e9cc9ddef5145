#!/usr/bin/env bash
# Prints what the benches record about the machine and the build, one `key: value` per line:
# the bench scripts (chat-bench.sh, udp-bench.sh, tls-bench.sh) add their own lines and save
# it next to their figures as target/bench/NAME-machine.txt.
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
echo "cpus: $(nproc) online"
echo "kernel: $(uname -sr)"
echo "rustc: $(rustc -V)"
echo "fd limit: $(ulimit -n)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo ?)"
