#!/bin/bash
# Median of 20: hotpatch attach -> served status, and the borrowed thread's pause.
# usage: scripts/bench-attach.sh DIR  (DIR holds hotpatch and libhotpatch_agent_so.so, e.g. target/release)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$1
export XDG_RUNTIME_DIR=$(mktemp -d); chmod 700 $XDG_RUNTIME_DIR
gcc -O1 -g -o $XDG_RUNTIME_DIR/t $ROOT/tests/c/attach_target.c -lpthread -ldl
gcc -O1 -g -shared -fPIC -o $XDG_RUNTIME_DIR/l.so $ROOT/tests/c/attach_lib.c
for i in $(seq 1 20); do
  $XDG_RUNTIME_DIR/t $XDG_RUNTIME_DIR/l.so 2 > /dev/null &
  P=$!
  sleep 0.2
  $D/hotpatch attach $P --json | tee -a $XDG_RUNTIME_DIR/runs.jsonl > /dev/null
  $D/hotpatch detach $P --json >> $XDG_RUNTIME_DIR/detach.jsonl
  kill $P; wait $P 2>/dev/null
done
python3 - $XDG_RUNTIME_DIR <<'PY'
import json,sys,statistics as st
d=sys.argv[1]
a=[json.loads(l) for l in open(d+'/runs.jsonl')]
b=[json.loads(l) for l in open(d+'/detach.jsonl')]
print("runs", len(a))
print("attach->status served ms: median %.2f min %.2f max %.2f" % (st.median([x['status_served_us']/1e3 for x in a]), min(x['status_served_us']/1e3 for x in a), max(x['status_served_us']/1e3 for x in a)))
print("attach: borrowed thread paused ms: median %.2f min %.2f max %.2f" % (st.median([x['paused_us']/1e3 for x in a]), min(x['paused_us']/1e3 for x in a), max(x['paused_us']/1e3 for x in a)))
print("detach: borrowed thread paused ms: median %.2f max %.2f; unmapped %d/%d" % (st.median([x['paused_us']/1e3 for x in b]), max(x['paused_us']/1e3 for x in b), sum(1 for x in b if x['unmapped']), len(b)))
PY
