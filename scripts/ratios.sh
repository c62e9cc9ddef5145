#!/usr/bin/env bash
# Ratios that a single run cannot settle: runs the echo bench's cases PASSES times in a row
# (every server in each pass, so each pass is side by side) and prints, per case, every pass's
# ratio of each proactor mode (and uring-loop) to each baseline, and their median, min and max.
# On a shared 2-vCPU machine one run's ratio moves by 3-5%, as much as the differences it is
# asked to judge; the spread over passes says how far to trust a figure.
#
#   scripts/ratios.sh                       5 passes of the 100- and 1,000-connection cases
#   PASSES=9 scripts/ratios.sh 'pingpong_1x'   another criterion filter, more passes
#   METRIC=cpu scripts/ratios.sh            5 passes of the scale bench's cpu phase instead:
#                                           server CPU per message (and messages/s) at
#                                           1 x 128 B, 100 x 128 B and 1,000 x 4 KiB
#
# Environment: PASSES (5), MEASURE (3, criterion seconds per server and case),
# PROACTOR_BENCH_SERVERS (default proactor-inline,proactor,tokio,mio; with METRIC=cpu
# proactor-inline,proactor,proactor-uring-inline,proactor-uring,mio,uring-loop), REPS (1,
# METRIC=cpu: runs per server and case in each pass, their median). Writes
# target/bench/ratios.csv (one row per pass, case and server: criterion's median in ns), or
# with METRIC=cpu target/bench/ratios_cpu.csv (one row per pass, case and server).
# QUIET_WAIT=S (default 0: off): before each pass, wait up to S seconds for the machine to be
# quiet (under 10% of both CPUs busy over 2 s: no build or test of someone else's running);
# each pass's line on stderr says how busy the machine was when it started.
set -euo pipefail
cd "$(dirname "$0")/.."

FILTER="${1:-pingpong_100x|pingpong_1000}"
PASSES="${PASSES:-5}"
MEASURE="${MEASURE:-3}"
METRIC="${METRIC:-time}"
TARGET="${CARGO_TARGET_DIR:-target}"
CRIT="${CRITERION_HOME:-$TARGET/criterion}"
OUT="$TARGET/bench"
mkdir -p "$OUT"

# Busy share of all CPUs over 2 s, in percent (from /proc/stat).
busy_pct() {
  local a b
  a=($(head -1 /proc/stat)); sleep 2; b=($(head -1 /proc/stat))
  local total=0 idle i
  for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
  idle=$(( (b[4] - a[4]) + (b[5] - a[5]) ))
  echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

# Waits (QUIET_WAIT seconds at most) until under 10% of the CPUs are busy; prints the last
# reading.
wait_quiet() {
  local end=$(( $(date +%s) + ${QUIET_WAIT:-0} )) pct
  pct=$(busy_pct)
  while [ "$pct" -ge 10 ] && [ "$(date +%s)" -lt "$end" ]; do
    sleep 3
    pct=$(busy_pct)
  done
  echo "$pct"
}

if [ "$METRIC" = cpu ]; then
  SERVERS="${PROACTOR_BENCH_SERVERS:-proactor-inline,proactor,proactor-uring-inline,proactor-uring,mio,uring-loop}"
  REVERSED=$(echo "$SERVERS" | tr ',' '\n' | tac | paste -sd, -)
  cargo bench --no-run --bench scale
  CSV="$OUT/ratios_cpu.csv"
  echo "pass,server,conns,size,messages,per_s,cpu_us_per_msg,cpu_busy" > "$CSV"
  for pass in $(seq 1 "$PASSES"); do
    if [ $((pass % 2)) -eq 0 ]; then order="$REVERSED"; else order="$SERVERS"; fi
    echo "pass $pass of $PASSES: $order ($(wait_quiet)% busy before, $(cut -d' ' -f1-3 /proc/loadavg) load)" >&2
    dir="$OUT/ratios-cpu/pass$pass"
    mkdir -p "$dir"
    cargo bench --bench scale -- --phases cpu --reps "${REPS:-1}" --servers "$order" --out "$dir" >/dev/null 2>&1
    tail -n +2 "$dir/cpu.csv" | sed "s/^/$pass,/" >> "$CSV"
  done
  python3 - "$CSV" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cpu = {(r["pass"], r["server"], r["conns"], r["size"]): float(r["cpu_us_per_msg"]) for r in rows}
rate = {(r["pass"], r["server"], r["conns"], r["size"]): float(r["per_s"]) for r in rows}
passes = sorted({r["pass"] for r in rows}, key=int)
cases = sorted({(r["conns"], r["size"]) for r in rows}, key=lambda c: (int(c[0]), int(c[1])))
servers = list(dict.fromkeys(r["server"] for r in rows))
print("\nServer CPU per message, median (min-max) over the passes, µs:\n")
print("| case | " + " | ".join(servers) + " |")
print("|---|" + "---:|" * len(servers))
for c, size in cases:
    cells = []
    for s in servers:
        v = [cpu[(p, s, c, size)] for p in passes if (p, s, c, size) in cpu]
        cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "-")
    print(f"| {c} x {size} B | " + " | ".join(cells) + " |")
print("\n| case | server | vs | CPU per message ratio, per pass (lower: less CPU) | median | min | max | throughput ratio, median (min-max) |")
print("|---|---|---|---|---:|---:|---:|---:|")
modes = [s for s in servers if s.startswith("proactor") or s == "uring-loop"]
for c, size in cases:
    for mode in modes:
        for base in ("mio", "mio-short", "tokio", "uring-loop"):
            if base == mode or base not in servers:
                continue
            ps = [p for p in passes if (p, mode, c, size) in cpu and (p, base, c, size) in cpu]
            if not ps:
                continue
            rs = [cpu[(p, mode, c, size)] / cpu[(p, base, c, size)] for p in ps]
            ts = [rate[(p, mode, c, size)] / rate[(p, base, c, size)] for p in ps]
            each = " ".join(f"{r:.2f}" for r in rs)
            print(f"| {c} x {size} B | {mode} | {base} | {each} | {statistics.median(rs):.2f}x"
                  f" | {min(rs):.2f}x | {max(rs):.2f}x | {statistics.median(ts):.2f}x"
                  f" ({min(ts):.2f}-{max(ts):.2f}) |")
PY
  exit 0
fi

export PROACTOR_BENCH_SERVERS="${PROACTOR_BENCH_SERVERS:-proactor-inline,proactor,tokio,mio}"

cargo bench --no-run --bench echo
CSV="$OUT/ratios.csv"
echo "pass,group,server,median_ns" > "$CSV"
SERVERS="$PROACTOR_BENCH_SERVERS"
REVERSED=$(echo "$SERVERS" | tr ',' '\n' | tac | paste -sd, -)
for pass in $(seq 1 "$PASSES"); do
  # Every other pass runs the servers in reverse order, so drift over a pass does not land
  # on the same server each time.
  if [ $((pass % 2)) -eq 0 ]; then
    export PROACTOR_BENCH_SERVERS="$REVERSED"
  else
    export PROACTOR_BENCH_SERVERS="$SERVERS"
  fi
  echo "pass $pass of $PASSES: $PROACTOR_BENCH_SERVERS ($(wait_quiet)% busy before, $(cut -d' ' -f1-3 /proc/loadavg) load)" >&2
  since=$(date +%s)
  cargo bench --bench echo -- --warm-up-time 1 --measurement-time "$MEASURE" --sample-size 15 "$FILTER" >/dev/null 2>&1
  python3 - "$CRIT" "$since" "$pass" >> "$CSV" <<'PY'
import glob, json, os, sys
crit, since, p = sys.argv[1], float(sys.argv[2]), sys.argv[3]
for path in glob.glob(os.path.join(crit, "**", "new", "benchmark.json"), recursive=True):
    if os.path.getmtime(path) < since:
        continue
    b = json.load(open(path))
    e = json.load(open(os.path.join(os.path.dirname(path), "estimates.json")))
    print(f"{p},{b['group_id']},{b['function_id']},{e['median']['point_estimate']:.0f}")
PY
done

python3 - "$CSV" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
t = {(r["pass"], r["group"], r["server"]): float(r["median_ns"]) for r in rows}
passes = sorted({r["pass"] for r in rows}, key=int)
groups = sorted({r["group"] for r in rows})
servers = {r["server"] for r in rows}
print("\n| case | mode | vs | per pass (throughput ratio) | median | min | max |")
print("|---|---|---|---|---:|---:|---:|")
MODES = ("proactor-inline", "proactor", "proactor-uring-inline", "proactor-uring", "uring-loop")
for g in groups:
    for mode in MODES:
        for base in ("mio", "mio-short", "tokio", "uring-loop"):
            if mode == base or mode not in servers or base not in servers:
                continue
            rs = [t[(p, g, base)] / t[(p, g, mode)] for p in passes
                  if (p, g, base) in t and (p, g, mode) in t]
            if rs:
                each = " ".join(f"{r:.2f}" for r in rs)
                print(f"| {g} | {mode} | {base} | {each} | {statistics.median(rs):.2f}x"
                      f" | {min(rs):.2f}x | {max(rs):.2f}x |")
PY
