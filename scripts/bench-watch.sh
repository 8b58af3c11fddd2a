#!/bin/bash
# Edit-to-live latency of `hotpatch watch` (BENCHMARKS.md, "watch").
#
#   PID=<pid> scripts/bench-watch.sh HOTPATCH_CLI CRATE_DIR FILE SUFFIX STATUS_EXPR N
#
# CRATE_DIR is the cargo package of the process PID (which runs the agent;
# XDG_RUNTIME_DIR as for the CLI). FILE (relative to it) contains
# "<number>SUFFIX" once. Each of N rounds adds 1000 to the number (a
# one-line edit), runs `hotpatch watch --once --json` and polls `hotpatch
# status --json` until the Python expression STATUS_EXPR (over `h`, the
# host's status, and `n`, the new number) is true. One line per round:
#   total_ms build_ms diff_ms link_ms apply_ms observed_ms setup_ms exe_ms checks_ms
# total: the CLI's own count (start to reply); observed: file saved -> the
# first status showing the new code's results; setup: build-id, cargo
# metadata, baseline (before the build); exe and checks are parts of diff.
#
# LOOP=1: one long `hotpatch watch --json` session instead of a `--once`
# process per round (what a user runs: the project, the baseline and the
# executable's symbols are read once; a save is noticed within 100 ms).
# GAP=S: sleep S seconds after each round.
set -euo pipefail
H=$1; DIR=$2; FILE=$3; SUFFIX=$4; EXPR=$5; N=$6
cur=$(grep -o "[0-9]*${SUFFIX}" "$DIR/$FILE" | head -1 | sed "s|${SUFFIX}\$||")
if [ "${LOOP:-}" = 1 ]; then
  log=$(mktemp)
  (cd "$DIR" && exec "$H" watch --json --pid "$PID" > "$log") &
  wpid=$!
  trap 'kill $wpid 2>/dev/null; rm -f "$log"' EXIT
  until grep -q '"watching"' "$log"; do sleep 0.05; done
  sleep 0.3
fi
for i in $(seq 1 "$N"); do
  next=$((cur + 1000))
  sed -i "s|${cur}${SUFFIX}|${next}${SUFFIX}|" "$DIR/$FILE"
  t0=$(date +%s%N)
  if [ "${LOOP:-}" = 1 ]; then
    until [ "$(grep -c timings_ms "$log")" -ge "$i" ]; do sleep 0.01; done
    out=$(grep timings_ms "$log" | sed -n "${i}p")
  else
    out=$(cd "$DIR" && "$H" watch --once --json --pid "$PID")
  fi
  while :; do
    ok=$("$H" status --json --pid "$PID" | python3 -c "import json,sys; h=json.load(sys.stdin)['host']; n=$next; print(bool($EXPR))")
    [ "$ok" = True ] && break
    sleep 0.01
  done
  t1=$(date +%s%N)
  echo "$out" | python3 -c "import json,sys; t=json.load(sys.stdin)['timings_ms']; print('%.0f %.0f %.1f %.1f %.1f %.0f %.1f %.1f %.1f' % (t['total'], t['build'], t['diff'], t['link'], t['apply'], ($t1-$t0)/1e6, t.get('setup', 0), t.get('exe_symbols', 0), t.get('checks', 0)))"
  cur=$next
  sleep "${GAP:-0}"
done
