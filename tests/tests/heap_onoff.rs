//! Sampling switched on and off 1,000 times while 8 threads allocate and
//! free through every hooked entry point: no crash, no corrupted block (each
//! block's contents are checked before it is freed), the allocator restored.
//!
//! One test in this file: it patches this process's malloc.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hotpatch_patcher::by_name;

const THREADS: usize = 8;
/// On/off cycles; `HOTPATCH_HEAP_CYCLES` lowers it for quick local runs
/// (each cycle is 16 stop-the-world operations: slow on a loaded machine).
fn cycles() -> usize {
    std::env::var("HOTPATCH_HEAP_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}
const SLOTS: usize = 64;

struct Block {
    p: *mut u8,
    len: usize,
    fill: u8,
}

fn fill_of(seed: u64) -> u8 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 1
}

/// Allocates `len` bytes with the entry point chosen by `kind`.
fn alloc(kind: u64, len: usize) -> *mut u8 {
    // SAFETY: plain C allocator calls with valid arguments; the results are
    // checked for NULL by the caller.
    unsafe {
        match kind % 6 {
            0 => libc::malloc(len).cast(),
            1 => libc::calloc(1, len).cast(),
            2 => {
                let p = libc::malloc(16);
                libc::realloc(p, len).cast()
            }
            3 => {
                let mut p = std::ptr::null_mut();
                if libc::posix_memalign(&mut p, 64, len) == 0 {
                    p.cast()
                } else {
                    std::ptr::null_mut()
                }
            }
            4 => libc::aligned_alloc(256, len.div_ceil(256) * 256).cast(),
            _ => libc::memalign(128, len).cast(),
        }
    }
}

fn worker(id: u64, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>, bad: Arc<AtomicU64>) {
    let mut slots: Vec<Option<Block>> = (0..SLOTS).map(|_| None).collect();
    let mut x = 0x1234_5678_9abc_def1u64 ^ id.wrapping_mul(0xff51_afd7_ed55_8ccd);
    let check = |b: &Block, bad: &AtomicU64| {
        // SAFETY: `b.p` is a live block of `b.len` bytes we own.
        let s = unsafe { std::slice::from_raw_parts(b.p, b.len) };
        if s.iter().any(|&v| v != b.fill) {
            bad.fetch_add(1, Ordering::Relaxed);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % SLOTS as u64) as usize;
        if let Some(b) = slots[i].take() {
            check(&b, &bad);
            if x & 0x100 == 0 {
                // Grow or shrink it in place of a free: realloc keeps the
                // prefix.
                let len = 16 + (x >> 20) as usize % (64 * 1024);
                // SAFETY: `b.p` is a live malloc-family block we own.
                let q = unsafe { libc::realloc(b.p.cast(), len) }.cast::<u8>();
                assert!(!q.is_null());
                // SAFETY: `q` has `len` bytes; the first min(len, b.len) were kept.
                let kept = unsafe { std::slice::from_raw_parts(q, len.min(b.len)) };
                if kept.iter().any(|&v| v != b.fill) {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                // SAFETY: as above.
                unsafe { std::ptr::write_bytes(q, b.fill, len) };
                slots[i] = Some(Block {
                    p: q,
                    len,
                    fill: b.fill,
                });
            } else {
                // SAFETY: a live block we own, freed once.
                unsafe { libc::free(b.p.cast()) };
            }
        } else {
            let len = 16 + (x >> 24) as usize % (64 * 1024);
            let p = alloc(x >> 8, len);
            assert!(!p.is_null(), "allocation failed");
            let fill = fill_of(x);
            // SAFETY: `p` has at least `len` bytes.
            unsafe { std::ptr::write_bytes(p, fill, len) };
            slots[i] = Some(Block { p, len, fill });
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
    for b in slots.into_iter().flatten() {
        check(&b, &bad);
        // SAFETY: a live block we own.
        unsafe { libc::free(b.p.cast()) };
    }
}

fn entry_bytes() -> Vec<(String, Vec<u8>)> {
    [
        "free",
        "malloc",
        "calloc",
        "realloc",
        "memalign",
        "posix_memalign",
    ]
    .iter()
    .map(|s| {
        let t = by_name::find(Some("libc.so.6"), s).expect("find");
        // SAFETY: libc's code, mapped for the process's life.
        let b = unsafe { std::slice::from_raw_parts(t.addr.as_ptr::<u8>(), 16) }.to_vec();
        (s.to_string(), b)
    })
    .collect()
}

#[test]
fn sampling_on_and_off_a_thousand_times_under_8_allocating_threads() {
    let original = entry_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let ops: Vec<Arc<AtomicU64>> = (0..THREADS).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let bad = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let (stop, ops, bad) = (stop.clone(), ops[i].clone(), bad.clone());
            std::thread::spawn(move || worker(i as u64, stop, ops, bad))
        })
        .collect();
    let mut samples = 0u64;
    let mut refused = Vec::new();
    let n = cycles();
    // Where the time goes (reported, never judged): start, stop, the rest.
    let (mut t_start, mut t_stop, mut t_snap) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let t0 = Instant::now();
    for cycle in 0..n {
        let t = Instant::now();
        let started = hotpatch_heap::start(8 * 1024);
        t_start += t.elapsed();
        match started {
            Ok(()) => {}
            Err(e) => {
                // A thread that could not be stopped in time is a clean
                // refusal (nothing patched); record and go on.
                refused.push(format!("cycle {cycle}: {} {e}", e.code()));
                continue;
            }
        }
        // Let the workers run with sampling on for a while (by their
        // progress, not by time).
        let before: u64 = ops.iter().map(|o| o.load(Ordering::Relaxed)).sum();
        while ops.iter().map(|o| o.load(Ordering::Relaxed)).sum::<u64>() < before + 256 {
            std::thread::yield_now();
        }
        // Every cycle: no stack has more frees than allocations (read
        // from the tables while the workers allocate, before any clamping).
        let unbalanced = hotpatch_heap::unbalanced_stacks().expect("balance");
        assert_eq!(
            unbalanced, 0,
            "cycle {cycle}: stacks with frees > allocations"
        );
        // A full snapshot (frames resolved while the workers allocate) at
        // the first and the middle cycle: each costs ~15-30 s here (debug
        // build, libc's detached DWARF, under a CPU hog), which is why
        // the other cycles check the raw tables instead.
        if cycle == 0 || cycle == n / 2 {
            let t = Instant::now();
            let p = hotpatch_heap::snapshot().expect("snapshot");
            t_snap += t.elapsed();
            assert!(p.samples.iter().all(|s| s.inuse_space >= 0));
            assert!(!p.samples.is_empty(), "cycle {cycle}: an empty snapshot");
        }
        samples += hotpatch_heap::sampler_counters().samples;
        let t = Instant::now();
        let stopped = hotpatch_heap::stop();
        t_stop += t.elapsed();
        if let Err(e) = stopped {
            // A site that could not be removed in time is left disabled
            // (calls run the original) and removed by the next start.
            assert_eq!(e.code(), "E_HEAP_RESTORE", "{e}");
            refused.push(format!("cycle {cycle}: {} {e}", e.code()));
        }
        assert!(!hotpatch_heap::is_running());
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("worker panicked");
    }
    // With the workers gone every thread stops at once: a last start/stop
    // removes whatever a refused stop left disabled.
    hotpatch_heap::start(8 * 1024).expect("final start");
    hotpatch_heap::stop().expect("final stop");
    let total: u64 = ops.iter().map(|o| o.load(Ordering::Relaxed)).sum();
    eprintln!(
        "{n} cycles in {:.1} s (start {:.1} s, stop {:.1} s, snapshots {:.1} s), ops {total}, samples {samples}, refused starts {}: {refused:?}",
        t0.elapsed().as_secs_f64(),
        t_start.as_secs_f64(),
        t_stop.as_secs_f64(),
        t_snap.as_secs_f64(),
        refused.len()
    );
    assert_eq!(bad.load(Ordering::Relaxed), 0, "corrupted blocks");
    assert!(samples > 0, "nothing was sampled");
    assert!(
        refused.len() < n / 10,
        "too many refused starts: {refused:?}"
    );
    assert_eq!(entry_bytes(), original, "allocator entry points restored");
}
