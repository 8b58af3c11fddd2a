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
# Plugins and fixtures are built from source by the tests themselves.
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

exec cargo test --workspace --no-fail-fast "$@"
