#!/bin/bash
# Edit-to-live latency of `hotpatch watch` (BENCHMARKS.md, "watch").
#
#   scripts/bench-watch.sh HOTPATCH_CLI CRATE_DIR FILE FROM_PREFIX N
#
# CRATE_DIR is a cargo package whose binary runs with the agent (its pid
# in $PID, XDG_RUNTIME_DIR set as for the CLI); FILE (relative to it)
# contains "FROM_PREFIX<number>". Each of N rounds bumps the number by one
# (a one-line edit), runs `hotpatch watch --once --json` and polls
# `hotpatch status` until the process reports the new number's results
# (status .host.results all >= the new number). Prints one line per round:
#   total_ms build_ms diff_ms link_ms apply_ms observed_ms
# (observed: save -> first status showing the new code).
set -euo pipefail
H=$1; DIR=$2; FILE=$3; PREFIX=$4; N=$5
cur=$(grep -o "${PREFIX}[0-9]*" "$DIR/$FILE" | head -1 | sed "s/^${PREFIX}//")
for i in $(seq 1 "$N"); do
  next=$((cur + 1000))
  sed -i "s/${PREFIX}${cur}/${PREFIX}${next}/" "$DIR/$FILE"
  t0=$(date +%s%N)
  out=$(cd "$DIR" && "$H" watch --once --json --pid "$PID")
  while :; do
    ok=$("$H" status --json --pid "$PID" | python3 -c "import json,sys; r=json.load(sys.stdin)['host']['results']; print(all(x % 1000000 >= $next for x in r))")
    [ "$ok" = True ] && break
    sleep 0.01
  done
  t1=$(date +%s%N)
  echo "$out" | python3 -c "import json,sys; t=json.load(sys.stdin)['timings_ms']; print('%.0f %.0f %.1f %.1f %.1f %.0f' % (t['total'], t['build'], t['diff'], t['link'], t['apply'], ($t1-$t0)/1e6))"
  cur=$next
done
