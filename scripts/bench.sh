#!/usr/bin/env bash
# Runs every benchmark of docs/benchmarks.md and prints the figures in a form to paste there.
#
#   scripts/bench.sh            full run on a quiet machine (about 6 minutes once built)
#   scripts/bench.sh --quick    smoke run: tiny sizes and times, proves everything works;
#                               its figures are noise, and it leaves docs/ alone
#
# Steps: release build -> benches/echo.rs (criterion, every server per case) -> benches/scale.rs
# (burst scaling 1K..16K, memory per idle connection, latency percentiles, syscalls per message
# under strace, server CPU per message, the independent 64 KiB stream client) -> syscalls per
# message again under `perf stat` (full speed), where perf can count syscall tracepoints ->
# summary with ratios against the issues' targets -> docs/scaling.svg.
# Everything lands in target/bench/ (criterion's own reports in target/criterion/).
#
# Environment, passed through to the benches:
#   PROACTOR_BENCH_SERVERS=proactor,mio   servers to run (default: all; the io_uring ones
#                                         where the kernel allows io_uring)
#   PROACTOR_BENCH_PIN=0                  no CPU pinning (default: server CPU 0, client CPU 1)
#   PROACTOR_BENCH_SERVER_CPU / PROACTOR_BENCH_CLIENT_CPU
#   PROACTOR_BENCH_TOKIO_WORKERS=N        tokio worker threads (default: 1 when pinned)
#   PROACTOR_BENCH_ACCEPTS=N              accepts the proactor server keeps outstanding (1)
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

TARGET="${CARGO_TARGET_DIR:-target}"
OUT="$TARGET/bench"
CRIT="${CRITERION_HOME:-$TARGET/criterion}"
mkdir -p "$OUT"
START=$(date +%s)

step() { printf '\n==> %s\n' "$*"; }

step "machine"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "cpus: $(nproc) online; $(lscpu | sed -n 's/^Thread(s) per core: *//p') thread(s) per core"
  echo "kernel: $(uname -sr)"
  echo "rustc: $(rustc -V)"
  echo "fd limit: $(ulimit -n); somaxconn: $(cat /proc/sys/net/core/somaxconn 2>/dev/null || echo ?)"
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo ?)"
} | tee "$OUT/machine.txt"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 20000 ]; then
  ulimit -n 20000 2>/dev/null || echo "warning: fd limit below 20,000: the 16K-connection runs will fail"
fi

step "build (release)"
cargo bench --no-run --bench echo --bench scale

step "strace (for the syscalls step)"
if ! command -v strace >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq strace
  else
    echo "strace is missing and cannot be installed here: the syscalls step will be skipped"
  fi
fi
command -v strace >/dev/null 2>&1 && strace -V | head -1

step "echo benches (criterion)"
if [ "$QUICK" = 1 ]; then
  export PROACTOR_BENCH_QUICK=1
  CRIT_ARGS=(--warm-up-time 0.1 --measurement-time 0.2 --sample-size 10)
  SCALE_ARGS=(--quick)
else
  unset PROACTOR_BENCH_QUICK
  CRIT_ARGS=(--warm-up-time 1 --measurement-time 5 --sample-size 30)
  SCALE_ARGS=()
fi
ECHO_START=$(date +%s)
cargo bench --bench echo -- "${CRIT_ARGS[@]}" 2>&1 | tee "$OUT/echo.txt"

step "scaling, memory, latency, syscalls, server CPU"
cargo bench --bench scale -- --out "$OUT" "${SCALE_ARGS[@]}" 2>&1 | tee "$OUT/scale.txt"

step "syscalls at full speed (perf stat of the syscall tracepoints)"
if perf stat -e syscalls:sys_enter_getpid true >/dev/null 2>&1; then
  cargo bench --bench scale -- --out "$OUT" --phases syscalls --tracer perf "${SCALE_ARGS[@]}" 2>&1 | tee -a "$OUT/scale.txt"
else
  rm -f "$OUT/syscalls-perf.csv"
  echo "perf cannot count syscall tracepoints here: skipped"
fi

step "summary"
python3 - "$CRIT" "$OUT" "$ECHO_START" <<'PY' | tee "$OUT/summary.md"
import csv, glob, json, os, sys

crit, out, since = sys.argv[1], sys.argv[2], float(sys.argv[3])
BASELINES = ["tokio", "mio", "uring-loop", "std"]

# Criterion medians of this run: (group, server) -> (median ns, throughput dict).
res = {}
for path in glob.glob(os.path.join(crit, "**", "new", "benchmark.json"), recursive=True):
    if os.path.getmtime(path) < since:
        continue  # an older run's result
    with open(path) as f:
        b = json.load(f)
    with open(os.path.join(os.path.dirname(path), "estimates.json")) as f:
        e = json.load(f)
    res[(b["group_id"], b["function_id"])] = (e["median"]["point_estimate"], b.get("throughput") or {})

def rate(ns, tp):
    """Human throughput for one iteration of `ns` nanoseconds."""
    if "Bytes" in tp:
        return f"{tp['Bytes'] / ns * 1e9 / 2**30:.2f} GiB/s"
    if "Elements" in tp:
        return f"{tp['Elements'] / ns * 1e9 / 1e3:.1f} K msg/s"
    return ""

def dur(ns):
    for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= div:
            return f"{ns / div:.3g} {unit}"
    return f"{ns:.3g} ns"

# Targets: group prefix -> [(baseline, minimum throughput ratio proactor/baseline)]; the
# readiness engine's (issue 5) and the io_uring engine's (issue 17).
TARGETS = {
    "stream_64KiB": [("mio", 1.0)],
    "pingpong_1x128B": [("tokio", 1.0), ("mio", 0.95)],
    "pingpong_100x128B": [("mio", 1.0), ("tokio", 1.3)],
    "pingpong_1000x4KiB": [("mio", 1.0), ("tokio", 1.3)],
    "burst_8192x1KiB": [("mio", 1.0)],
}
URING_TARGETS = {
    "stream_64KiB": [("mio", 0.95)],
    "pingpong_1x128B": [("mio", 0.95)],
    "pingpong_100x128B": [("mio", 1.0)],
    "pingpong_1000x4KiB": [("mio", 1.0)],
}

ORDER = ["stream_", "pingpong_1x", "pingpong_100x128B", "x4KiB", "burst_"]
groups = sorted({g for g, _ in res}, key=lambda g: next((i for i, o in enumerate(ORDER) if o in g), 99))
# Both proactor modes are judged: inline is what a dedicated server loop should use, the
# threaded default what select/game-loop/async users get.
MODES = ["proactor-inline", "proactor", "proactor-uring-inline", "proactor-uring"]
URING = {"proactor-uring-inline", "proactor-uring"}
ALL = MODES + BASELINES
groups = [g for g in groups if any((g, s) in res for s in ALL)]  # not the pool's groups
print("### Echo (criterion medians; time per iteration, throughput)\n")
print("| case | " + " | ".join(ALL) + " |")
print("|---|" + "---:|" * len(ALL))
for g in groups:
    cells = []
    for s in ALL:
        r = res.get((g, s))
        cells.append(f"{dur(r[0])}, {rate(*r)}" if r else "-")
    print(f"| {g} | " + " | ".join(cells) + " |")
print("\n### Ratios (throughput of the proactor mode / the baseline's; > 1: proactor faster)\n")
print("| case | mode | vs mio | vs tokio | vs std | vs uring-loop | targets |")
print("|---|---|---:|---:|---:|---:|---|")
verdicts = []
for g in groups:
    for mode in MODES:
        p = res.get((g, mode))
        if not p:
            continue
        ratios = []
        for base in ("mio", "tokio", "std", "uring-loop"):
            b = res.get((g, base))
            # Throughput ratio = baseline time / proactor time.
            ratios.append(f"{b[0] / p[0]:.2f}x" if b else "-")
        target = []
        for base, need in (URING_TARGETS if mode in URING else TARGETS).get(g, []):
            b = res.get((g, base))
            if b:
                got = b[0] / p[0]
                ok = got >= need
                target.append(f"≥{need}x {base}: {'PASS' if ok else 'FAIL'}")
                verdicts.append((f"{g} vs {base} ({mode})", f"{got:.2f}x", f">= {need}x", ok))
        print(f"| {g} | {mode} | " + " | ".join(ratios) + " | " + "; ".join(target) + " |")

def read_csv(name):
    try:
        with open(os.path.join(out, name), newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []

def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")

lat = {(r["server"], r["conns"]): r for r in read_csv("latency.csv")}
mem = {r["server"]: r for r in read_csv("memory.csv")}
sc = {}
for r in read_csv("syscalls.csv"):
    sc[(r["server"], r["conns"])] = sc.get((r["server"], r["conns"]), 0.0) + num(r["calls_per_msg"])
# (At full speed, where perf could count them; strace slows every call and so batches more.)
scp = {}
for r in read_csv("syscalls-perf.csv"):
    scp[(r["server"], r["conns"])] = scp.get((r["server"], r["conns"]), 0.0) + num(r["calls_per_msg"])
cpu = read_csv("cpu.csv")
cpu_by = {(r["server"], int(r["conns"]), int(r["size"])): num(r["cpu_us_per_msg"]) for r in cpu}
for mode in MODES:
    if mode in URING:
        if mode in mem:
            got = num(mem[mode]["bytes_per_conn"])
            verdicts.append((f"idle memory per connection beyond the ring's fixed memory ({mode})", f"{got:.0f} B", "<= 130 B", got <= 130))
        if mode == "proactor-uring-inline":
            for table, how in ((scp, "perf"), (sc, "strace")):
                if (mode, "100") in table:
                    got = table[(mode, "100")]
                    verdicts.append((f"syscalls per message, 100 conns, {how} ({mode})", f"{got:.2f}", "<= 0.6", round(got, 2) <= 0.6))
        for c, size in ((100, 128), (1000, 4096)):
            p = cpu_by.get((mode, c, size))
            for base, need in (("mio", 0.9), ("uring-loop", 1.1)):
                b = cpu_by.get((base, c, size))
                if p and b:
                    got = p / b
                    verdicts.append((f"server CPU per message, {c} x {size} B, vs {base} ({mode})", f"{got:.2f}x", f"<= {need}x", got <= need))
        continue
    for conns in ("100", "1000"):
        p, m = lat.get((mode, conns)), lat.get(("mio", conns))
        if p and m:
            got = num(p["p99_us"]) / num(m["p99_us"])
            verdicts.append((f"p99 latency at {conns} conns vs mio ({mode})", f"{got:.2f}x", "<= 1.5x", got <= 1.5))
    if mode in mem:
        got = num(mem[mode]["bytes_per_conn"])
        verdicts.append((f"idle memory per connection ({mode})", f"{got:.0f} B", "<= 128 B", got <= 128))
    for conns, need in (("1", 3.0), ("100", 2.1)):
        if (mode, conns) in sc:
            got = sc[(mode, conns)]
            # Judged at the two decimals shown (so up to 0.005 over passes): a connection's
            # first short read is followed by one read that sees EAGAIN (until then a short
            # read cannot prove the socket drained: `ConnState::hup` in src/driver.rs), once
            # per connection, which shows as 0.0001 per message over 20,000 at one
            # connection; the target is about the steady state.
            verdicts.append((f"syscalls per message, {conns} conn(s) ({mode})", f"{got:.2f}", f"<= {need}", round(got, 2) <= need))

if cpu:
    print("\n### Server CPU per echoed message at saturation (µs; lower is better)\n")
    cases = sorted({(int(r["conns"]), int(r["size"])) for r in cpu})
    by = {(r["server"], int(r["conns"]), int(r["size"])): num(r["cpu_us_per_msg"]) for r in cpu}
    names = [s for s in ALL if any(k[0] == s for k in by)]
    print("| case | " + " | ".join(names) + " | inline / mio | uring-inline / mio | uring-inline / uring-loop |")
    print("|---|" + "---:|" * (len(names) + 3))
    for c, size in cases:
        cells = [f"{by[(s, c, size)]:.2f}" if (s, c, size) in by else "-" for s in names]
        def ratio(a, b):
            x, y = by.get((a, c, size)), by.get((b, c, size))
            return f"{x / y:.2f}x" if x and y else "-"
        ratios = [ratio("proactor-inline", "mio"), ratio("proactor-uring-inline", "mio"),
                  ratio("proactor-uring-inline", "uring-loop")]
        print(f"| {c} x {size} B | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")

stream = read_csv("stream.csv")
if stream:
    import statistics
    print("\n### Independent 64 KiB stream client (MiB/s, median of the runs; scale.txt has the rest)\n")
    st = {}
    for r in stream:
        st.setdefault(r["server"], []).append(num(r["mib_per_s"]))
    med = {s: statistics.median(v) for s, v in st.items()}
    names = [s for s in ALL if s in med]
    print("| " + " | ".join(names) + " |")
    print("|" + "---:|" * len(names))
    print("| " + " | ".join(f"{med[s]:.0f}" + (f" ({med[s] / med['mio']:.2f}x mio)" if "mio" in med else "") for s in names) + " |")

scale = {}
for r in read_csv("scale.csv"):
    scale.setdefault(r["server"], []).append((num(r["conns"]) / 1000, num(r["total_s"])))
def slope(pts):
    pts = [p for p in pts if p[1] == p[1]]
    if len(pts) < 2:
        return float("nan")
    n = len(pts); mx = sum(p[0] for p in pts) / n; my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")
if scale:
    print("\n### Burst scaling fit (seconds per 1,000 connections, connects included)\n")
    names = [s for s in ALL if s in scale]
    print("| " + " | ".join(names) + " |")
    print("|" + "---:|" * len(names))
    print("| " + " | ".join(f"{slope(scale[s]):.4f}" for s in names) + " |")

print("\n### Targets\n")
print("| target | measured | required | |")
print("|---|---:|---:|---|")
for name, got, need, ok in verdicts:
    print(f"| {name} | {got} | {need} | {'PASS' if ok else 'FAIL'} |")
print(f"\n(Scale, memory, latency, syscall, CPU and stream tables: {out}/scale.txt; CSV files beside it.)")
PY

step "chart"
if [ "$QUICK" = 1 ]; then
  CHART="$OUT/scaling.svg" # a smoke run's noise never lands in docs/
else
  CHART=docs/scaling.svg
fi
python3 scripts/plot_scaling.py "$OUT/scale.csv" "$CHART"

step "done in $(( $(date +%s) - START )) s; outputs in $OUT, chart $CHART"
