//! Heap sampling in a process whose allocator is jemalloc or mimalloc
//! (`LD_PRELOAD`ed into a child, as a user would run one): the sampler
//! hooks that allocator's entry points (glibc's stay untouched), the
//! estimate of a known pattern is within its stated sampling error of the
//! truth for every hooked entry point, frees are matched, `stop` restores
//! the allocator's bytes, and sampling switched on and off while threads
//! allocate corrupts nothing. For jemalloc the in-use estimate is also
//! compared with jemalloc's own `stats.allocated`.
//!
//! Each test runs its checks in a child (the allocator must be preloaded
//! at exec; the hooks patch the whole process).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hotpatch_patcher::by_name;
use hotpatch_tests::entry::file_and_memory;
use hotpatch_tests::loader_fixtures::{child_code, child_role, run_child};

const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
const MIMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2";

/// The entry points the sampler hooks (heap/src/sampler.rs, `HOOKS`).
const SYMBOLS: [&str; 8] = [
    "free",
    "malloc",
    "calloc",
    "realloc",
    "valloc",
    "memalign",
    "aligned_alloc",
    "posix_memalign",
];
/// 8 KiB blocks at one sample per 16 KiB: each sampled with p = 0.39.
const BLOCK: usize = 8192;
const N: usize = 2048;
const RATE: u64 = 16 * 1024;

unsafe extern "C" {
    /// `valloc(3)` (not in the `libc` crate).
    fn valloc(size: libc::size_t) -> *mut libc::c_void;
}

/// Allocates one block of `BLOCK` bytes through entry point `kind`.
fn alloc_via(kind: usize) -> *mut u8 {
    // SAFETY: plain C allocator calls with valid arguments; the caller
    // checks for NULL.
    unsafe {
        match kind {
            0 => libc::malloc(BLOCK).cast(),
            1 => libc::calloc(1, BLOCK).cast(),
            2 => {
                let p = libc::malloc(16);
                libc::realloc(p, BLOCK).cast()
            }
            3 => {
                let mut p = std::ptr::null_mut();
                if libc::posix_memalign(&mut p, 64, BLOCK) == 0 {
                    p.cast()
                } else {
                    std::ptr::null_mut()
                }
            }
            4 => libc::aligned_alloc(256, BLOCK).cast(),
            5 => libc::memalign(128, BLOCK).cast(),
            _ => valloc(BLOCK).cast(),
        }
    }
}

/// One function per entry point, so that the profile tells them apart.
macro_rules! via {
    ($($name:ident = $kind:expr),*) => {
        $(
            #[inline(never)]
            fn $name() -> Vec<usize> {
                (0..N)
                    .map(|i| {
                        let p = std::hint::black_box(alloc_via($kind));
                        assert!(!p.is_null(), "allocation failed");
                        // SAFETY: `p` has BLOCK writable bytes.
                        unsafe { std::ptr::write_bytes(p, i as u8, BLOCK) };
                        p as usize
                    })
                    .collect()
            }
        )*
        const VIA: &[(&str, fn() -> Vec<usize>)] = &[$((stringify!($name), $name)),*];
    };
}

via!(
    heap_via_malloc = 0,
    heap_via_calloc = 1,
    heap_via_realloc = 2,
    heap_via_posix_memalign = 3,
    heap_via_aligned_alloc = 4,
    heap_via_memalign = 5,
    heap_via_valloc = 6
);

/// An entry point: its address, its first bytes in the file and in memory.
type Entry = (usize, Vec<u8>, Vec<u8>);

type MallctlFn = unsafe extern "C" fn(
    *const libc::c_char,
    *mut libc::c_void,
    *mut libc::size_t,
    *mut libc::c_void,
    libc::size_t,
) -> libc::c_int;

/// jemalloc's `stats.allocated` after an `epoch` refresh and a flush of
/// this thread's cache (so freed blocks are not counted as in use).
fn jemalloc_allocated() -> u64 {
    // SAFETY: a NUL-terminated name looked up in the global scope.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"mallctl".as_ptr()) };
    assert!(!f.is_null(), "jemalloc exports mallctl");
    // SAFETY: jemalloc's documented `mallctl` signature.
    let mallctl: MallctlFn = unsafe { std::mem::transmute(f) };
    // SAFETY: the documented names with the documented types (void for
    // the flush, uint64_t for epoch, size_t for stats.allocated).
    unsafe {
        mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
        let mut epoch: u64 = 1;
        let mut len = std::mem::size_of::<u64>();
        assert_eq!(
            mallctl(
                c"epoch".as_ptr(),
                (&raw mut epoch).cast(),
                &mut len,
                (&raw mut epoch).cast(),
                len,
            ),
            0,
            "mallctl(epoch)"
        );
        let mut v: libc::size_t = 0;
        let mut len = std::mem::size_of::<libc::size_t>();
        assert_eq!(
            mallctl(
                c"stats.allocated".as_ptr(),
                (&raw mut v).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            ),
            0,
            "mallctl(stats.allocated): jemalloc built without statistics?"
        );
        v as u64
    }
}

/// Standard deviation of the in-use (or allocated) estimate of `n` blocks
/// of `s` bytes at `rate`: `sqrt(n s^2 (1 - p) / p)`, `p = 1 - e^(-s/rate)`.
fn analytic_sd(n: usize, s: usize, rate: u64) -> f64 {
    let s = s as f64;
    let p = -(-s / rate as f64).exp_m1();
    (n as f64 * s * s * (1.0 - p) / p).sqrt()
}

/// The child's checks; `expect` is the allocator's file-name prefix.
fn sample_under(expect: &str) {
    let preload = std::env::var("LD_PRELOAD").expect("LD_PRELOAD set by the parent");
    let real = std::fs::canonicalize(&preload).expect("the preloaded allocator");
    // The registry names a module by the path it was loaded under (a
    // symlink here for mimalloc), as `dladdr` does.
    let module = by_name::find(Some(&preload), "malloc")
        .unwrap_or_else(|e| panic!("{preload} not loaded in the child: {e}"))
        .module;
    assert!(module.contains(expect), "{module}");
    let before: HashMap<&str, Entry> = SYMBOLS
        .iter()
        .filter_map(|s| Some((*s, file_and_memory(&module, s)?)))
        .collect();
    for s in ["free", "malloc", "calloc", "realloc"] {
        assert!(before.contains_key(s), "{module} has no {s}");
    }
    for (s, (_, file, mem)) in &before {
        assert_eq!(file, mem, "{s}: memory differs from the file before start");
    }
    let glibc: Vec<(&str, Entry)> = ["malloc", "free", "calloc", "realloc"]
        .iter()
        .map(|s| (*s, file_and_memory("libc.so.6", s).expect("glibc symbol")))
        .collect();

    hotpatch_heap::start(RATE).expect("start");
    let (_, allocator, _) = hotpatch_heap::running().expect("running");
    assert_eq!(
        std::fs::canonicalize(&allocator).ok(),
        Some(real.clone()),
        "the session names the preloaded allocator ({allocator})"
    );
    // Every entry point of the allocator is patched (aliases share one
    // site), glibc's are not.
    let mut seen = Vec::new();
    for (s, (addr, file, _)) in &before {
        // SAFETY: the allocator's code, mapped for the process's life.
        let now = unsafe { std::slice::from_raw_parts(*addr as *const u8, 16) };
        assert_ne!(now, &file[..], "{s}: not patched while sampling");
        seen.push(*s);
    }
    for (s, (addr, file, _)) in &glibc {
        // SAFETY: glibc's code, mapped for the process's life.
        let now = unsafe { std::slice::from_raw_parts(*addr as *const u8, 16) };
        assert_eq!(now, &file[..], "glibc's {s} was patched");
    }
    let jemalloc = expect.starts_with("libjemalloc");
    let je0 = jemalloc.then(jemalloc_allocated);

    // The pattern: N blocks per entry point; every other one freed again.
    let mut kept = Vec::new();
    for (name, f) in VIA {
        let blocks = f();
        for (i, p) in blocks.into_iter().enumerate() {
            if i % 2 == 1 {
                // SAFETY: a live block of this allocator, freed once.
                unsafe { libc::free(p as *mut libc::c_void) };
            } else {
                kept.push((*name, p));
            }
        }
    }
    let je1 = jemalloc.then(jemalloc_allocated);
    let p = hotpatch_heap::snapshot().expect("snapshot");

    let names = |s: &hotpatch_heap::HeapSample| -> Vec<String> {
        s.stack
            .iter()
            .flat_map(|&l| p.locations()[l].function_names())
            .collect()
    };
    let alloc_sd = analytic_sd(N, BLOCK, RATE);
    let mut est_total = 0.0;
    let mut var_total = 0.0;
    for (name, _) in VIA {
        let (mut alloc, mut inuse, mut var, mut sampled) = (0i64, 0i64, 0f64, 0u64);
        for s in &p.samples {
            if names(s).iter().any(|n| n.ends_with(name)) {
                alloc += s.alloc_space;
                inuse += s.inuse_space;
                var += s.inuse_space_variance;
                sampled += s.sampled;
            }
        }
        let truth_alloc = (N * BLOCK) as f64;
        let truth_inuse = (N / 2 * BLOCK) as f64;
        let sd = var.sqrt();
        println!(
            "{name}: sampled {sampled}, alloc {alloc} (truth {truth_alloc}, sd {alloc_sd:.0}), in use {inuse} (truth {truth_inuse}, stated sd {sd:.0})"
        );
        // 5 standard deviations: a double-counted entry point (an
        // allocator calling its own hooked entry) is +100%.
        assert!(
            (alloc as f64 - truth_alloc).abs() < 5.0 * alloc_sd,
            "{name}: allocated {alloc} vs {truth_alloc} (sd {alloc_sd:.0})"
        );
        assert!(sd > 0.0, "{name}: no stated error");
        assert!(
            (inuse as f64 - truth_inuse).abs() < 5.0 * sd,
            "{name}: in use {inuse} vs {truth_inuse} (stated sd {sd:.0})"
        );
        est_total += inuse as f64;
        var_total += var;
    }
    assert!(
        p.samples
            .iter()
            .all(|s| s.inuse_space >= 0 && s.inuse_objects >= 0)
    );
    assert_eq!(p.stats.untracked, 0);
    if let (Some(a0), Some(a1)) = (je0, je1) {
        let truth = (VIA.len() * N / 2 * BLOCK) as f64;
        let je = a1 as f64 - a0 as f64;
        let sd = var_total.sqrt();
        println!(
            "jemalloc stats.allocated grew {je} (truth {truth}); estimate {est_total} (stated sd {sd:.0}, {:+.2}% vs jemalloc)",
            100.0 * (est_total - je) / je
        );
        // jemalloc's own figure is the truth up to its size classes (8 KiB
        // is one) and the harness's few allocations.
        assert!(
            (je - truth).abs() < 0.01 * truth,
            "jemalloc stats.allocated grew {je}, truth {truth}"
        );
        assert!(
            (est_total - je).abs() < 5.0 * sd + 0.01 * truth,
            "estimate {est_total} vs jemalloc's {je} (stated sd {sd:.0})"
        );
    }

    hotpatch_heap::stop().expect("stop");
    for (s, (addr, file, _)) in &before {
        let (a, f, mem) = file_and_memory(&module, s).expect("still there");
        assert_eq!(a, *addr);
        assert_eq!(&f, file);
        assert_eq!(mem, *file, "{s}: bytes differ from the file after stop");
    }
    for (_, p) in kept {
        // SAFETY: live blocks, freed once.
        unsafe { libc::free(p as *mut libc::c_void) };
    }
    println!("CODE=ok {} hooks={}", allocator, seen.len());
}

/// Sampling on and off `cycles` times while 4 threads allocate through
/// every entry point and check each block's contents before freeing it.
fn on_off_under(cycles: usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4u64)
        .map(|id| {
            let (stop, bad, ops) = (stop.clone(), bad.clone(), ops.clone());
            std::thread::spawn(move || {
                let mut slots: Vec<(usize, u8)> = vec![(0, 0); 64];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ id;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = (x % 64) as usize;
                    let (p, fill) = slots[i];
                    if p != 0 {
                        // SAFETY: our live block of BLOCK bytes.
                        let b = unsafe { std::slice::from_raw_parts(p as *const u8, BLOCK) };
                        if b.iter().any(|&c| c != fill) {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                        // SAFETY: freed once.
                        unsafe { libc::free(p as *mut libc::c_void) };
                    }
                    let q = alloc_via((x >> 20) as usize % 7);
                    assert!(!q.is_null());
                    let fill = (x >> 40) as u8 | 1;
                    // SAFETY: `q` has BLOCK writable bytes.
                    unsafe { std::ptr::write_bytes(q, fill, BLOCK) };
                    slots[i] = (q as usize, fill);
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                for (p, _) in slots {
                    if p != 0 {
                        // SAFETY: freed once.
                        unsafe { libc::free(p as *mut libc::c_void) };
                    }
                }
            })
        })
        .collect();
    // A worker not scheduled within the heap crate's stop timeout makes a
    // start refuse cleanly (nothing patched: E_HEAP_PATCH) or a stop leave
    // its sites disabled (E_HEAP_RESTORE, removed by the next start), as in
    // heap_onoff.rs: on a busy machine that is not a failure, but it must
    // stay rare, and a last start/stop with the workers gone must succeed.
    let mut refused = Vec::new();
    for i in 0..cycles {
        if let Err(e) = hotpatch_heap::start(if i % 2 == 0 { RATE } else { 4096 }) {
            assert_eq!(e.code(), "E_HEAP_PATCH", "{e}");
            refused.push(format!("start {i}: {e}"));
            continue;
        }
        assert_eq!(hotpatch_heap::unbalanced_stacks().expect("running"), 0);
        if let Err(e) = hotpatch_heap::stop() {
            assert_eq!(e.code(), "E_HEAP_RESTORE", "{e}");
            refused.push(format!("stop {i}: {e}"));
        }
        assert!(!hotpatch_heap::is_running());
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    hotpatch_heap::start(RATE).expect("final start");
    hotpatch_heap::stop().expect("final stop");
    eprintln!(
        "on/off: {cycles} cycles, refused {}: {refused:?}",
        refused.len()
    );
    assert!(
        refused.len() <= cycles / 4,
        "too many refusals: {refused:?}"
    );
    assert_eq!(bad.load(Ordering::Relaxed), 0, "corrupted blocks");
    assert!(ops.load(Ordering::Relaxed) > 0);
    println!("CODE=onoff ok");
}

fn run_under(test: &str, lib: &str) -> String {
    assert!(
        std::path::Path::new(lib).exists(),
        "{lib} is missing: apt-get install libjemalloc2 libmimalloc2.0 (scripts/test.sh does)"
    );
    let out = run_child(test, "child", |c| {
        c.env("LD_PRELOAD", lib);
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child {test} failed");
    child_code(&out).unwrap_or_else(|| panic!("child {test} printed no CODE="))
}

#[test]
fn jemalloc_is_sampled_and_agrees_with_its_own_statistics() {
    if child_role().is_some() {
        sample_under("libjemalloc");
        on_off_under(20);
        return;
    }
    let code = run_under(
        "jemalloc_is_sampled_and_agrees_with_its_own_statistics",
        JEMALLOC,
    );
    // All eight entry points exist in jemalloc at distinct addresses.
    assert!(
        code.starts_with("ok ") && code.contains("libjemalloc") && code.ends_with(" hooks=8"),
        "{code}"
    );
}

#[test]
fn mimalloc_is_sampled() {
    if child_role().is_some() {
        sample_under("libmimalloc");
        on_off_under(20);
        return;
    }
    let code = run_under("mimalloc_is_sampled", MIMALLOC);
    // mimalloc's `mi_malloc`, `mi_free`, ... share the standard names'
    // addresses: the same eight sites cover them.
    assert!(
        code.starts_with("ok ") && code.contains("libmimalloc") && code.ends_with(" hooks=8"),
        "{code}"
    );
}
