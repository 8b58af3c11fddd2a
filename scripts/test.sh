#!/usr/bin/env bash
# Runs hotpatch's whole test suite on a fresh clone.
#
# Installs what the tests use when it is missing (needs root for apt):
#   golang-go  -> `go tool pprof`, the reader of our profiles
#   binutils   -> `addr2line`, `objcopy`, `strip` (symbolizer comparisons, debug files)
#   gcc        -> C fixtures for the loader tests
#   libc6-dbg  -> detached debug info under /usr/lib/debug/.build-id
#   zlib1g, libbz2-1.0 -> real libraries patched by tests/tests/patcher_libraries.rs
#   llvm       -> `llvm-symbolizer`, the reference for C names (profiler_names.rs)
#   python3    -> the import-cycle check and the interpreter attach_e2e attaches to
#   libc6-dev  -> libc.a for the static target attach_e2e must refuse
#   libjemalloc2, libmimalloc2.0 -> the other allocators heap_allocators.rs samples
# Plugins, binaries and examples the tests use are built from source, once,
# before any test runs (tests/src/bin/build-fixtures.rs; a test run by hand
# builds what it misses itself).
#
# Stages: (1) compile the suite, (2) build the fixtures -- both quiet work,
# what `--no-run` stops after; (3) run the test binaries in parallel groups
# (see GROUPS below), each group's output kept in a file and printed whole
# when the group ends, then a summary; the exit status is 1 when any group
# failed.
#
#   scripts/test.sh                  the whole suite, grouped
#   scripts/test.sh --no-run         stages 1 and 2 only
#   scripts/test.sh -- --nocapture   arguments after `--` go to every test binary
#   scripts/test.sh -p hotpatch-patcher   any other cargo argument: stages 1
#                                    and 2, then one plain `cargo test` with it
#   HOTPATCH_TEST_GROUPS=1 scripts/test.sh   the whole suite in one plain
#                                    sequential `cargo test` (as before groups)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v addr2line >/dev/null 2>&1 || need+=(binutils)
command -v objcopy >/dev/null 2>&1 || need+=(binutils)
command -v cc >/dev/null 2>&1 || need+=(gcc)
[ -d /usr/lib/debug/.build-id ] || need+=(libc6-dbg)
[ -e /lib/x86_64-linux-gnu/libz.so.1 ] || need+=(zlib1g)
[ -e /lib/x86_64-linux-gnu/libbz2.so.1.0 ] || need+=(libbz2-1.0)
command -v llvm-symbolizer >/dev/null 2>&1 || need+=(llvm)
command -v python3 >/dev/null 2>&1 || need+=(python3)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
[ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] || need+=(libjemalloc2)
[ -e /usr/lib/x86_64-linux-gnu/libmimalloc.so.2 ] || need+=(libmimalloc2.0)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "test.sh: installing ${need[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "test.sh: missing ${need[*]}; install them (apt-get install ${need[*]}) and re-run" >&2
        exit 1
    fi
fi

# Debian's golang-go puts `go` in /usr/lib/go/bin with a /usr/bin symlink;
# make sure a fresh shell finds it.
export PATH="$PATH:/usr/lib/go/bin"

cargo_args=()
harness_args=()
no_run=false
while [ $# -gt 0 ]; do
    case "$1" in
        --) harness_args=("$@"); break ;;
        --no-run) no_run=true ;;
        *) cargo_args+=("$1") ;;
    esac
    shift
done

t_start=$(date +%s)
grouped=true
if [ ${#cargo_args[@]} -gt 0 ] || [ "${HOTPATCH_TEST_GROUPS:-3}" = 1 ]; then
    grouped=false
fi
# (1) Compile everything the suite runs, with the very cargo invocations of
# stage 3 (feature unification depends on the packages selected: compiling
# `--workspace` and then running `-p hotpatch-tests` would compile again).
if $grouped; then
    cargo test --workspace --exclude hotpatch-tests --no-run
    cargo test -p hotpatch-tests --no-run
else
    cargo test --workspace --no-fail-fast --no-run ${cargo_args[@]+"${cargo_args[@]}"}
fi
# (2) The fixtures, exactly as the tests build them (same cargo invocations,
# same target directory), so that the tests find them fresh.
cargo run --quiet -p hotpatch-tests --bin build-fixtures
echo "test.sh: compiled and fixtures built in $(( $(date +%s) - t_start )) s" >&2
if $no_run; then
    exit 0
fi

if ! $grouped; then
    exec cargo test --workspace --no-fail-fast ${cargo_args[@]+"${cargo_args[@]}"} ${harness_args[@]+"${harness_args[@]}"}
fi

# (3) The test binaries in three groups run side by side. Most of the slow
# binaries wait (on ptrace stops, child processes, timers), so they overlap
# well on two cores. The tests are hermetic (own temp and runtime
# directories, own child processes, waits on their own process groups).
# Within a group, cargo runs the binaries one after another.
#
# - profiler: the workspace's unit and doc tests, then every profiler_*
#   binary. The profiler tests measure CPU shares (under a hog of their
#   own); they never run alongside each other, and the unit tests are short.
#   heap_onoff (1000 allocator patch cycles, ~510 s) runs last in this
#   group: in the rest group it made that group the long pole.
# - patcher: patcher_*, symbolizer_*, import_cycles.
# - rest: every other binary of tests/tests (watch_* included: in the
#   fresh-clone run of 2026-12-02 the patcher group with them took 1270 s,
#   the other two ~715 s each), including any new one.
prof=() patch=() rest=()
for f in tests/tests/*.rs; do
    name=$(basename "$f" .rs)
    case "$name" in
        profiler_* | heap_onoff) prof+=(--test "$name") ;;
        patcher_* | symbolizer_* | import_cycles) patch+=(--test "$name") ;;
        *) rest+=(--test "$name") ;;
    esac
done

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
run_group() {
    local name=$1
    shift
    local t0 status=0
    t0=$(date +%s)
    "$@" >"$logs/$name.out" 2>&1 || status=$?
    echo "$status $(( $(date +%s) - t0 ))" >"$logs/$name.status"
}
# A group that runs longer than this is stopped (HOTPATCH_GROUP_TIMEOUT,
# seconds). Before it is killed, what it was doing is printed: its output so
# far (cargo names the binary, the harness the tests running for over 60 s),
# every process it started with its state and kernel wait channel, and each
# thread's backtrace (gdb, when installed). A hang then fails the run with
# its cause on screen instead of running into the CI's own time limit with
# no output at all (what happened to the fresh-clone CI run of stop 13: the
# rest group never ended and its buffered output was lost).
group_timeout=${HOTPATCH_GROUP_TIMEOUT:-2700}
# Every process below $1, depth first.
descendants() {
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$c"
        descendants "$c"
    done
}
# What the still-running group rooted at pid $1 is doing: its processes
# with their state and kernel wait channel, and the backtraces of at most
# two test binaries (45 s each). Bounded, so that it ends before the CI's
# own limit (the official run of stop 16 was cut off in the middle of an
# unbounded one: a gdb of up to 120 s for every process of the group).
# Each test binary also has its own bound (scripts/test-runner.sh), so
# this is the second line of defence.
diagnose_group() {
    local root=$1 p exe n=0
    local procs
    procs=$(descendants "$root")
    echo "---- processes of the group (pid, elapsed, cpu, state, wait channel, command)"
    for p in $procs; do
        ps -o pid=,etime=,time=,stat=,wchan:24=,args= -p "$p" 2>/dev/null | cut -c1-220 || true
    done
    for p in $procs; do
        exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
        case "$exe" in
            */target/debug/deps/*) ;;
            *) continue ;;
        esac
        echo "---- threads of $p ($exe)"
        for t in /proc/"$p"/task/*; do
            echo "  tid ${t##*/}: $(cut -d' ' -f3 "$t/stat" 2>/dev/null) wchan=$(cat "$t/wchan" 2>/dev/null) syscall=$(cut -d' ' -f1 "$t/syscall" 2>/dev/null)"
        done | head -60
        if [ "$n" -lt 2 ] && command -v gdb >/dev/null 2>&1; then
            n=$((n + 1))
            timeout -s KILL 45 gdb -p "$p" -batch -nx -ex "thread apply all bt 30" 2>&1 \
                | grep -vE '^\[(New LWP|Thread debugging|Inferior)|^warning:|^Using host' | head -300 || true
        fi
    done
}
group_profiler() {
    local status=0
    cargo test --workspace --exclude hotpatch-tests --no-fail-fast ${harness_args[@]+"${harness_args[@]}"} || status=1
    cargo test -p hotpatch-tests --no-fail-fast --lib --bins ${harness_args[@]+"${harness_args[@]}"} || status=1
    cargo test -p hotpatch-tests --no-fail-fast --doc ${harness_args[@]+"${harness_args[@]}"} || status=1
    cargo test -p hotpatch-tests --no-fail-fast "${prof[@]}" ${harness_args[@]+"${harness_args[@]}"} || status=1
    return "$status"
}

# Every test binary of stage 3 runs under scripts/test-runner.sh: a bound on
# its wall time (HOTPATCH_BINARY_TIMEOUT, 1500 s by default; the slowest
# binary takes about a third of that on a busy 2-core machine) and a report
# of what it was doing when it outlived it. A hang then costs one binary.
# (cargo's runner setting changes how binaries are started, not how they
# are built: nothing compiles again.)
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/scripts/test-runner.sh"

pids=()
run_group profiler group_profiler &
pids+=("$!")
run_group patcher cargo test -p hotpatch-tests --no-fail-fast "${patch[@]}" ${harness_args[@]+"${harness_args[@]}"} &
pids+=("$!")
run_group rest cargo test -p hotpatch-tests --no-fail-fast "${rest[@]}" ${harness_args[@]+"${harness_args[@]}"} &
pids+=("$!")
# Print each group whole as soon as it ends (in the order they end); stop a
# group that outlives $group_timeout after printing what it was doing.
groups=(profiler patcher rest)
t_groups=$(date +%s)
# HOTPATCH_DEADLINE (epoch seconds, set by .ci/run from its own start) caps
# the bound so that a stopped group's report is printed before the CI's
# own time limit ends the run without output; 3 minutes are kept for the
# backtraces and the summary.
if [ -n "${HOTPATCH_DEADLINE:-}" ]; then
    left=$(( HOTPATCH_DEADLINE - t_groups - 180 ))
    [ "$left" -lt 60 ] && left=60
    if [ "$left" -lt "$group_timeout" ]; then
        group_timeout=$left
    fi
fi
echo "test.sh: each test group is stopped after ${group_timeout} s" >&2
printed=()
failed=()
while [ ${#printed[@]} -lt 3 ]; do
    for i in 0 1 2; do
        g=${groups[$i]}
        if [ -e "$logs/$g.status" ] && [[ " ${printed[*]-} " != *" $g "* ]]; then
            read -r status secs <"$logs/$g.status"
            note=""
            [ -e "$logs/$g.timedout" ] && note=" (TIMED OUT: stopped after ${group_timeout} s)"
            echo "==================== test group $g: exit $status, ${secs} s${note} ===================="
            cat "$logs/$g.out"
            [ -e "$logs/$g.timedout" ] && cat "$logs/$g.timedout"
            printed+=("$g")
            summary+=("$g: exit $status, ${secs} s${note}")
            [ "$status" = 0 ] || failed+=("$g")
        elif [ ! -e "$logs/$g.status" ] && [ ! -e "$logs/$g.timedout" ] \
            && [ $(( $(date +%s) - t_groups )) -gt "$group_timeout" ]; then
            # Printed as it is found, not kept for later: if the CI's own
            # limit comes first, what was found is on screen.
            echo "test.sh: group $g still running after ${group_timeout} s; what it is doing:"
            diagnose_group "${pids[$i]}" 2>&1 || true
            echo "test.sh: stopping group $g (what it printed so far follows when it ends)" | tee "$logs/$g.timedout"
        fi
        # A stopped group's processes are killed until the group ends (a
        # group of several cargo commands would start the next one).
        if [ -e "$logs/$g.timedout" ] && [ ! -e "$logs/$g.status" ]; then
            for p in $(descendants "${pids[$i]}"); do
                kill -KILL "$p" 2>/dev/null || true
            done
        fi
    done
    sleep 1
done
for p in "${pids[@]}"; do
    wait "$p" || true
done

# The CI shows the head and the tail of a long log, not its middle, where
# a failed test's output sits inside its group's: the official run of
# stop 15 failed in two groups with every failure message cut away. So the
# summary repeats, for each failed group, the binary and the first lines of
# each failed test's output (the panic message), within a bounded length.
failure_digest() {
    awk -v max_block=30 -v max_total=160 '
        /^ *Running / { bin = $0 }
        /^---- .* stdout ----$/ { inblock = 1; n = 0; print "  " bin; print "  " $0; total += 2; next }
        inblock && (/^failures:$/ || /^---- /) { inblock = 0 }
        inblock && /^stack backtrace:$/ { inblock = 0; print "    [backtrace: in the group output]"; total++ }
        inblock {
            if (n < max_block && total < max_total) { print "    " $0; total++ }
            else if (n == max_block) { print "    [... cut]" }
            n++
        }
        /^test result: FAILED/ { print "  " $0; total++ }
        /^error: .*failed/ { print "  " $0; total++ }
    ' "$1"
}

echo "==================== test.sh summary ===================="
for line in "${summary[@]}"; do
    echo "  $line"
done
echo "  total (compile, fixtures, tests): $(( $(date +%s) - t_start )) s"
for g in ${failed[@]+"${failed[@]}"}; do
    echo "---- what failed in group $g"
    failure_digest "$logs/$g.out"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "test.sh: FAILED groups: ${failed[*]} (their failing tests are listed in their output above)" >&2
    exit 1
fi
echo "test.sh: all groups passed"
