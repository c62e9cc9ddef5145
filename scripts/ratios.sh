#!/usr/bin/env bash
# Throughput ratios that a single criterion run cannot settle: runs the echo bench's cases
# PASSES times in a row (every server in each pass, so each pass is side by side) and prints,
# per case, every pass's ratio of each proactor mode to each baseline, and their median, min
# and max. On a shared 2-vCPU machine one run's ratio moves by 3-5%, as much as the
# differences it is asked to judge; the spread over passes says how far to trust a figure.
#
#   scripts/ratios.sh                       5 passes of the 100- and 1,000-connection cases
#   PASSES=9 scripts/ratios.sh 'pingpong_1x'   another criterion filter, more passes
#
# Environment: PASSES (5), MEASURE (3, criterion seconds per server and case),
# PROACTOR_BENCH_SERVERS (default proactor-inline,proactor,tokio,mio). Writes
# target/bench/ratios.csv (one row per pass, case and server: criterion's median in ns).
set -euo pipefail
cd "$(dirname "$0")/.."

FILTER="${1:-pingpong_100x|pingpong_1000}"
PASSES="${PASSES:-5}"
MEASURE="${MEASURE:-3}"
export PROACTOR_BENCH_SERVERS="${PROACTOR_BENCH_SERVERS:-proactor-inline,proactor,tokio,mio}"
TARGET="${CARGO_TARGET_DIR:-target}"
CRIT="${CRITERION_HOME:-$TARGET/criterion}"
OUT="$TARGET/bench"
mkdir -p "$OUT"

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
  echo "pass $pass of $PASSES: $PROACTOR_BENCH_SERVERS ($(cut -d' ' -f1-3 /proc/loadavg) load)" >&2
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
for g in groups:
    for mode in ("proactor-inline", "proactor"):
        for base in ("mio", "mio-short", "tokio"):
            if mode not in servers or base not in servers:
                continue
            rs = [t[(p, g, base)] / t[(p, g, mode)] for p in passes
                  if (p, g, base) in t and (p, g, mode) in t]
            if rs:
                each = " ".join(f"{r:.2f}" for r in rs)
                print(f"| {g} | {mode} | {base} | {each} | {statistics.median(rs):.2f}x"
                      f" | {min(rs):.2f}x | {max(rs):.2f}x |")
PY
