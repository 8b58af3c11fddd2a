#!/usr/bin/env bash
# Paired A/B of heap sampling overhead (BENCHMARKS.md "heap").
#
#   scripts/heap_ab.sh DIR ROUNDS OPS RATE SIZES RING variant...
#
# DIR holds one malloc_bench binary per variant, named bench_<variant>
# (cargo build --profile fixture -p hotpatch-heap --example malloc_bench
# --target-dir target/fixtures, then copy target/fixtures/fixture/examples/
# malloc_bench). The variant `off` runs bench_base with sampling off. Each
# round runs every variant once, in the order given, and records the
# workers' CPU time (`cpu_work`); the result per variant is the median CPU
# and the median of the per-round ratio to `off` (rounds are paired, so a
# load change between rounds cancels). Prints the load average before and
# after.
set -euo pipefail
dir=$1 rounds=$2 ops=$3 rate=$4 sizes=$5 ring=$6
shift 6
raw=$(mktemp)
uptime
for i in $(seq "$rounds"); do
    line="$i"
    for v in "$@"; do
        if [ "$v" = off ]; then
            c=$("$dir/bench_base" off "$ops" "$sizes" "$ring" | grep -o 'cpu_work=[0-9.]*' | cut -d= -f2)
        else
            c=$("$dir/bench_$v" "$rate" "$ops" "$sizes" "$ring" | grep -o 'cpu_work=[0-9.]*' | cut -d= -f2)
        fi
        line="$line $c"
    done
    echo "$line" | tee -a "$raw"
done
uptime
python3 - "$raw" "$@" <<'PY'
import statistics, sys
raw = [l.split()[1:] for l in open(sys.argv[1])]
names = sys.argv[2:]
off = names.index("off")
for j, n in enumerate(names):
    vals = [float(r[j]) for r in raw]
    rat = [float(r[j]) / float(r[off]) for r in raw]
    print(f"{n}: median cpu {statistics.median(vals):.4f} s, median ratio to off {statistics.median(rat):.4f} (n={len(vals)})")
if "base" in names:
    b = names.index("base")
    for j, n in enumerate(names):
        if n not in ("off", "base"):
            rat = [float(r[j]) / float(r[b]) for r in raw]
            print(f"{n}: median ratio to base {statistics.median(rat):.4f}")
PY
rm -f "$raw"
