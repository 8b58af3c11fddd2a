#!/usr/bin/env bash
# Cargo's runner for the test binaries when scripts/test.sh runs the suite
# (CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER): runs one test binary with
# a bound on its wall time, HOTPATCH_BINARY_TIMEOUT seconds (default 1500).
#
# A binary that outlives it is reported -- which tests the harness says are
# still running is already in its output ("has been running for over 60
# seconds"); this adds every process the binary started with its state and
# kernel wait channel, each thread's system call, and the binary's thread
# backtraces (gdb, bounded) -- then killed with everything it started, and
# cargo reports the binary killed (SIGKILL). The other binaries of the group still run, so one
# hang costs one binary, not the CI run, and its cause is on screen: the
# official runs of stops 13 and 16 ran into the CI's own time limit with a
# group that never ended and nothing that said why.
#
#   scripts/test-runner.sh BINARY [ARGS...]
set -uo pipefail

limit=${HOTPATCH_BINARY_TIMEOUT:-1500}

# Every process below $1, depth first.
descendants() {
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$c"
        descendants "$c"
    done
}

report() {
    local root=$1 p exe t n=0
    local procs
    procs="$root $(descendants "$root")"
    echo "---- processes (pid, elapsed, cpu, state, wait channel, command)"
    for p in $procs; do
        ps -o pid=,etime=,time=,stat=,wchan:24=,args= -p "$p" 2>/dev/null | cut -c1-220 || true
    done
    for p in $procs; do
        exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
        echo "---- threads of $p ($exe)"
        for t in /proc/"$p"/task/*; do
            echo "  tid ${t##*/}: $(cut -d' ' -f3 "$t/stat" 2>/dev/null) wchan=$(cat "$t/wchan" 2>/dev/null) syscall=$(cut -d' ' -f1 "$t/syscall" 2>/dev/null)"
        done | head -60
        # Backtraces of at most three processes (the test binary first),
        # 45 s each: the report must end well before the CI's own limit.
        if [ "$n" -lt 3 ] && command -v gdb >/dev/null 2>&1; then
            case "$exe" in
                */cargo | */bash | */sh | */dash | */rustc | */sleep | */python3*) ;;
                *)
                    n=$((n + 1))
                    timeout -s KILL 45 gdb -p "$p" -batch -nx -ex "thread apply all bt 30" 2>&1 \
                        | grep -vE '^\[(New LWP|Thread debugging|Inferior)|^warning:|^Using host' \
                        | head -300 || true
                    ;;
            esac
        fi
    done
}

if [ $# -eq 0 ]; then
    echo "usage: $0 BINARY [ARGS...]" >&2
    exit 2
fi

# The binary runs in the foreground (exec: same pid, cargo's signals and
# stdin, nothing ignored -- a background job of a non-interactive shell
# would start with SIGINT ignored and stdin on /dev/null). The watchdog is
# a grandchild left to init, so the test binary never sees it among its
# own children (a test that reaps any child would otherwise collect it).
me=$$
# The process's start time (field 22 of /proc/PID/stat; kept across exec):
# a pid reused after the binary ended -- by another process or a thread --
# has another, and is never reported or killed.
started_at() {
    sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20
}
me_start=$(started_at "$me")
watchdog() {
    local start state
    start=$(date +%s)
    while :; do
        state=$(sed 's/.*) //' "/proc/$me/stat" 2>/dev/null | cut -c1)
        # Gone, ended and waiting for cargo to collect it, or the pid is
        # someone else's now.
        if [ -z "$state" ] || [ "$state" = Z ] || [ "$(started_at "$me")" != "$me_start" ]; then
            exit 0
        fi
        if [ $(( $(date +%s) - start )) -ge "$limit" ]; then
            break
        fi
        sleep 1
    done
    {
        echo
        echo "test-runner.sh: $1 still running after ${limit} s (HOTPATCH_BINARY_TIMEOUT); what it is doing:"
        report "$me"
        echo "test-runner.sh: killing $1 and every process it started"
    } 2>&1
    local p
    [ "$(started_at "$me")" = "$me_start" ] || exit 0
    for p in $(descendants "$me") "$me"; do
        kill -KILL "$p" 2>/dev/null || true
    done
    exit 0
}
( watchdog "$1" </dev/null & )
exec "$@"
