#!/usr/bin/env bash
# Runs a command on a busy machine: one busy loop per core (and one more),
# plus a `demo-target serve` agent of this user with the default runtime
# directory (so a test that finds "the user's agents" finds a stranger).
# Kills exactly the processes it started when the command ends, on failure
# and on Ctrl-C too. Exits with the command's status.
#
#   scripts/with-load.sh ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi

started=()
# Whether $1 still runs (exists and is not a zombie waiting to be reaped).
running() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}
cleanup() {
    local pid i
    for pid in "${started[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    # Up to 10 s for SIGTERM, then SIGKILL: never hang here.
    for pid in "${started[@]}"; do
        for i in $(seq 100); do
            running "$pid" || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Build the agent host before loading the machine.
cargo build -q -p demo-target
demo="${CARGO_TARGET_DIR:-target}/debug/demo-target"

"$demo" serve >/dev/null 2>&1 &
started+=("$!")
echo "with-load.sh: demo-target serve agent pid $!" >&2

hogs=$(( $(nproc) + 1 ))
for _ in $(seq "$hogs"); do
    sh -c 'while :; do :; done' &
    started+=("$!")
done
echo "with-load.sh: $hogs busy loops (pids ${started[*]:1})" >&2

status=0
"$@" || status=$?
exit "$status"
