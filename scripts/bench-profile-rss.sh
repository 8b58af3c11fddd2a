#!/usr/bin/env bash
# usage: scripts/bench-profile-rss.sh MODE   (MODE = cli: `hotpatch profile` (resolved in the CLI); target: the agent's `profile` command (resolved in the target))
set -euo pipefail
F=/work/wt/prof-remote/target/fixtures/fixture
export XDG_RUNTIME_DIR=$(mktemp -d)
"$F/demo-target" serve >/dev/null 2>&1 &
P=$!
while [ ! -S "$XDG_RUNTIME_DIR/hotpatch/$P.sock" ]; do sleep 0.05; done
sleep 1
rss() { awk '/^VmRSS/{print $2}' /proc/$P/status; }
before=$(rss)
for i in 1 2 3; do
  if [ "$1" = cli ]; then
    "$F/hotpatch" profile --seconds 2 -o "$XDG_RUNTIME_DIR/p.pb.gz" --pid $P >/dev/null
  else
    python3 - "$XDG_RUNTIME_DIR/hotpatch/$P.sock" <<'PY'
import socket, sys, json
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"cmd":"profile","seconds":2}\n')
f = s.makefile('rb'); r = json.loads(f.readline())
for h in r["result"]["payloads"]: f.read(h["len"])
PY
  fi
done
after=$(rss)
peak=$(awk '/^VmHWM/{print $2}' /proc/$P/status)
echo "$1 before_kib=$before after_kib=$after growth_mib=$(( (after - before) / 1024 )) peak_kib=$peak"
kill $P; wait $P 2>/dev/null || true
rm -rf "$XDG_RUNTIME_DIR"
