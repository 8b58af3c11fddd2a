//! Bad input to the heap profiler: each a clear error code, nothing left
//! patched. Tests that patch the allocator run in a child process each (they
//! patch this process's malloc, which the harness's other threads use).

use std::process::Command;

use hotpatch_heap::{LeakCheck, leak_check};
use hotpatch_tests::loader_fixtures::{TempDir, cc_shared, child_code, child_role, run_child};

fn code<T>(r: hotpatch_heap::Result<T>) -> &'static str {
    match r {
        Ok(_) => "OK",
        Err(e) => e.code(),
    }
}

/// Runs `test` of this file alone in a child and returns its `CODE=` line.
fn in_child(test: &str, configure: impl FnOnce(&mut Command)) -> String {
    let out = run_child(test, "child", configure);
    assert!(
        out.status.success(),
        "child {test} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    child_code(&out).unwrap_or_else(|| {
        panic!(
            "child {test} printed no CODE=:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn snapshot_and_stop_without_start_and_bad_rates() {
    // Nothing is patched by these: safe beside the other tests.
    assert_eq!(code(hotpatch_heap::snapshot()), "E_HEAP_NOT_STARTED");
    assert_eq!(code(hotpatch_heap::stop()), "E_HEAP_NOT_STARTED");
    assert_eq!(code(hotpatch_heap::start(0)), "E_HEAP_BAD_RATE");
    assert_eq!(code(hotpatch_heap::start(1 << 31)), "E_HEAP_BAD_RATE");
    assert_eq!(
        code(leak_check(
            "/nonexistent/libnothing.so",
            &LeakCheck {
                cycles: 0,
                ..LeakCheck::default()
            }
        )),
        "E_HEAP_NO_CYCLES"
    );
    assert!(!hotpatch_heap::is_running());
}

#[test]
fn start_twice_stop_during_a_snapshot_and_a_missing_plugin() {
    if child_role().is_some() {
        hotpatch_heap::start(64 * 1024).expect("start");
        let twice = code(hotpatch_heap::start(64 * 1024));
        let (_, during) = hotpatch_heap::snapshot_then(|| {
            (code(hotpatch_heap::stop()), code(hotpatch_heap::snapshot()))
        })
        .expect("snapshot");
        assert!(hotpatch_heap::is_running(), "a refused stop stops nothing");
        hotpatch_heap::stop().expect("stop after the snapshot");
        // A plugin that does not exist: the load error, and the session the
        // leak check started is stopped again.
        let missing = code(leak_check(
            "/nonexistent/libnothing.so",
            &LeakCheck::default(),
        ));
        let running = hotpatch_heap::is_running();
        println!("CODE={twice},{},{},{missing},{running}", during.0, during.1);
        return;
    }
    assert_eq!(
        in_child(
            "start_twice_stop_during_a_snapshot_and_a_missing_plugin",
            |_| {}
        ),
        "E_HEAP_ALREADY_STARTED,E_HEAP_BUSY,E_HEAP_BUSY,E_HEAP_PLUGIN,false"
    );
}

/// A bump allocator the sampler does not know, preloaded into the child.
const WEIRD_ALLOC: &str = r#"
#include <stddef.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>
#define ARENA (1UL << 32)
static char *arena;
static size_t used;
static char *base(void) {
    char *a = __atomic_load_n(&arena, __ATOMIC_ACQUIRE);
    if (a) return a;
    char *m = mmap(0, ARENA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return 0;
    char *none = 0;
    if (!__atomic_compare_exchange_n(&arena, &none, m, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        munmap(m, ARENA);
        return none;
    }
    return m;
}
static void *bump(size_t n, size_t align) {
    char *b = base();
    if (!b) return 0;
    if (align < 16) align = 16;
    size_t old = __atomic_load_n(&used, __ATOMIC_RELAXED), start, end;
    do {
        start = (old + 16 + align - 1) & ~(align - 1);
        end = start + n;
        if (end > ARENA || end < start) return 0;
    } while (!__atomic_compare_exchange_n(&used, &old, end, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    ((size_t *)(b + start))[-1] = n;
    return b + start;
}
void *malloc(size_t n) { return bump(n, 16); }
void free(void *p) { (void)p; }
void *calloc(size_t n, size_t m) {
    size_t t;
    if (__builtin_mul_overflow(n, m, &t)) return 0;
    return bump(t, 16); /* fresh pages are zero and never reused */
}
size_t malloc_usable_size(void *p) { return p ? ((size_t *)p)[-1] : 0; }
void *realloc(void *p, size_t n) {
    void *q = bump(n, 16);
    if (p && q) { size_t o = malloc_usable_size(p); memcpy(q, p, o < n ? o : n); }
    return q;
}
void *memalign(size_t a, size_t n) { return bump(n, a); }
void *aligned_alloc(size_t a, size_t n) { return bump(n, a); }
void *valloc(size_t n) { return bump(n, 4096); }
void *pvalloc(size_t n) { return bump((n + 4095) & ~4095UL, 4096); }
int posix_memalign(void **out, size_t a, size_t n) {
    void *p = bump(n, a);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
"#;

#[test]
fn a_process_whose_allocator_is_unknown_is_refused() {
    if child_role().is_some() {
        let r = hotpatch_heap::start(64 * 1024);
        let detail = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
        println!("DETAIL={detail}");
        println!("CODE={}", code(r));
        return;
    }
    let dir = TempDir::new("heap-weird");
    let so = cc_shared(&dir.join("libweirdalloc.so"), WEIRD_ALLOC, &[]);
    assert_eq!(
        in_child("a_process_whose_allocator_is_unknown_is_refused", |c| {
            c.env("LD_PRELOAD", &so);
        }),
        "E_HEAP_UNKNOWN_ALLOCATOR"
    );
}
