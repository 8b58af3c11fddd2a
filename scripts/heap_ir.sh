#!/usr/bin/env bash
# Load-independent cost of heap sampling (BENCHMARKS.md "heap"): instruction
# counts and simulated cache misses of malloc_bench's workers, sampling off
# against on, under valgrind's callgrind.
#
#   scripts/heap_ir.sh BENCH [OPS] [SIZES] [RING] [RATE...]
#
# BENCH is a malloc_bench binary (cargo build --profile fixture -p
# hotpatch-heap --example malloc_bench --target-dir target/fixtures;
# target/fixtures/fixture/examples/malloc_bench). Defaults: OPS 20000 per
# thread, SIZES 16-65536, RING 512, RATEs 524288 65536.
#
# Only what runs inside `malloc_bench::work` (the 8 workers' loops and every
# malloc/free they call, hooks included) is counted (--toggle-collect): the
# session's start, snapshot and stop are not. `--smc-check=all` makes
# valgrind see the patched allocator entries (libc's text is file-backed).
# Valgrind runs one thread at a time and simulates one cache hierarchy
# (its defaults for this CPU), so the miss figures are those of a
# serialised run: deterministic and independent of the machine's load,
# not a prediction of wall time. The figures are the same run after run
# (up to the few instructions the sampled stacks vary by).
set -euo pipefail
bench=$1
ops=${2:-20000}
sizes=${3:-16-65536}
ring=${4:-512}
shift $(($# < 4 ? $# : 4))
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(524288 65536)
out=$(mktemp -d)
export XDG_RUNTIME_DIR=$out
uptime
for mode in off "${rates[@]}"; do
    valgrind --tool=callgrind --cache-sim=yes --smc-check=all \
        --toggle-collect='malloc_bench::work' \
        --callgrind-out-file="$out/cg.$mode" \
        "$bench" "$mode" "$ops" "$sizes" "$ring" >"$out/stdout.$mode" 2>"$out/stderr.$mode"
    grep -o 'samples=[0-9]*' "$out/stdout.$mode" || true
done
uptime
python3 - "$out" "$ops" off "${rates[@]}" <<'PY'
import sys
out, ops, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def totals(mode):
    ev, tot = None, None
    for l in open(f"{out}/cg.{mode}"):
        if l.startswith("events:"):
            ev = l.split()[1:]
        elif l.startswith("summary:") or l.startswith("totals:"):
            tot = [int(x) for x in l.split()[1:]]
    return dict(zip(ev, tot + [0] * (len(ev) - len(tot))))
t = {m: totals(m) for m in modes}
pairs = 8 * ops
keys = ["Ir", "Dr", "Dw", "D1mr", "D1mw", "DLmr", "DLmw"]
print("mode      " + "".join(f"{k:>14}" for k in keys) + "   Ir/pair")
for m in modes:
    print(f"{m:<10}" + "".join(f"{t[m].get(k, 0):>14,}" for k in keys) + f"   {t[m]['Ir'] / pairs:8.1f}")
for m in modes[1:]:
    rel = []
    for k in keys:
        a, b = t["off"].get(k, 0), t[m].get(k, 0)
        rel.append(f"{100.0 * (b - a) / a:+13.2f}%" if a else f"{'-':>14}")
    print(f"{m:<10}" + "".join(rel) + f"   {(t[m]['Ir'] - t['off']['Ir']) / pairs:+8.1f}")
PY
for m in "${rates[@]}"; do
    echo "== $m: the sampler's functions (self Ir; callgrind's call counts double-count the relay's jumps)"
    callgrind_annotate --inclusive=no "$out/cg.$m" 2>/dev/null |
        grep -E 'hotpatch_heap|\?\?\?:0x|libm|expm1|e_log' | head -20 || true
done
rm -rf "$out"
