//! Patcher benchmarks, ours side by side with `retour` 0.4.0-alpha.4
//! (`GenericDetour`, its stable-Rust API; 0.3.x no longer builds on current
//! stable: it names the `stdcall`/`fastcall` ABIs on x86-64) in one run:
//!
//! - `call`: the cost of a call that reaches a hooked function (entry
//!   `jmp` -> relay -> slot -> replacement for ours) against a direct call,
//!   and of calling the original through `Hook::original` vs retour's
//!   `call` (trampoline);
//! - `swap`: retargeting a live hook. Ours is one atomic store; retour has no
//!   swap, so its rows are the nearest substitutes, labeled as such;
//! - `install_remove`: a full patch/unpatch cycle with 0, 2 and 8 busy
//!   threads. Ours parks every other thread while it writes, so its busy
//!   threads call the very function being patched. Retour does not stop
//!   threads and is not safe to patch a function other threads are running,
//!   so its busy threads call a *different* function: the same CPU load,
//!   none of the hazard.
//!
//! - `install_remove_parts`: reading `/proc/self/maps` and one
//!   stop-the-world + release, alone (where our cycle's time goes).
//!
//! Every measured function has its own target: install refuses a target that
//! is already patched (`E_PATCH_ALREADY_PATCHED`), and retour would corrupt one.
//! Results and the command are in the repository's `BENCHMARKS.md`.
//!
//! ```text
//! CARGO_TARGET_DIR=target/bench cargo bench -p hotpatch-patcher --bench hook
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use hotpatch_patcher::Hook;
use retour::GenericDetour;

/// The signature of every target and replacement here.
type Target = extern "C" fn(u64) -> u64;

/// Defines `#[inline(never)]` targets with distinct bodies (distinct
/// constants, so no two can be merged into one symbol). `imul r64, r/m64,
/// imm32` is 7 bytes: each entry has room for a 5-byte jump.
macro_rules! targets {
    ($($(#[$doc:meta])* $name:ident = $k:literal;)*) => {
        $(
            $(#[$doc])*
            #[inline(never)]
            extern "C" fn $name(x: u64) -> u64 {
                x.wrapping_mul($k).wrapping_add($k >> 7)
            }
        )*
    };
}

targets! {
    /// `call`: never patched, the baseline.
    call_direct = 0x2545_f491;
    /// `call`: hooked by us, enabled.
    call_ours = 0x1b87_3593;
    /// `call`: hooked by us, disabled (slot -> trampoline).
    call_ours_disabled = 0x4cf5_ad43;
    /// `call`: detoured by retour, enabled.
    call_retour = 0x6c8e_9cf5;
    /// `swap`: ours.
    swap_ours = 0x7fb5_d329;
    /// `swap`: retour's disable + enable.
    swap_retour_toggle = 0x5851_f42d;
    /// `swap`: retour's re-created detour.
    swap_retour_recreate = 0x1656_67b1;
    /// `install_remove`: ours, 0 busy threads.
    ir_ours_0 = 0x27d4_eb2f;
    /// `install_remove`: ours, 2 busy threads.
    ir_ours_2 = 0x3c6e_f372;
    /// `install_remove`: ours, 8 busy threads.
    ir_ours_8 = 0x6a09_e667;
    /// `install_remove`: retour, 0 busy threads.
    ir_retour_0 = 0x510e_527f;
    /// `install_remove`: retour, 2 busy threads.
    ir_retour_2 = 0x1f83_d9ab;
    /// `install_remove`: retour, 8 busy threads.
    ir_retour_8 = 0x5be0_cd19;
    /// What retour's busy threads call instead of the target being patched.
    busy_elsewhere = 0x428a_2f98;
}

/// A trivial replacement.
#[inline(never)]
extern "C" fn repl_a(x: u64) -> u64 {
    x ^ 0x5a
}

/// Another trivial replacement (for swaps).
#[inline(never)]
extern "C" fn repl_b(x: u64) -> u64 {
    x ^ 0xa5
}

/// Calls `f` the way every measured call does: through a pointer the
/// optimizer cannot see through.
#[inline(always)]
fn call(f: Target, x: u64) -> u64 {
    black_box(f)(black_box(x))
}

/// Threads spinning on `f`: one call per iteration, `yield_now` every 1024.
struct Busy {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<u64>>,
}

impl Busy {
    /// Starts `n` threads and returns once each has made its first 1024 calls.
    fn start(n: usize, f: Target) -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicUsize::new(0));
        let handles = (0..n)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let running = Arc::clone(&running);
                std::thread::spawn(move || {
                    let mut acc = i as u64;
                    let mut first = true;
                    loop {
                        for _ in 0..1024 {
                            acc = call(f, acc);
                        }
                        if first {
                            running.fetch_add(1, Ordering::Release);
                            first = false;
                        }
                        if stop.load(Ordering::Relaxed) {
                            return acc;
                        }
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        while running.load(Ordering::Acquire) < n {
            std::thread::yield_now();
        }
        Busy { stop, handles }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            black_box(h.join().expect("busy thread panicked"));
        }
    }
}

/// Threads in this process now (criterion's own workers included).
fn threads_now() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn bench_call(c: &mut Criterion) {
    let mut g = c.benchmark_group("call");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);

    let ours = Hook::install(call_ours as Target, repl_a as Target).expect("install call_ours");
    assert_eq!(call(call_ours, 1), repl_a(1));
    let mut ours_disabled = Hook::install(call_ours_disabled as Target, repl_a as Target)
        .expect("install call_ours_disabled");
    ours_disabled.disable().expect("disable");
    // SAFETY:
    // - `call_retour` and `repl_a` have the same signature and ABI;
    // - `call_retour` is patched by nothing else and is called by no other
    //   thread while retour writes it.
    let retour =
        unsafe { GenericDetour::<Target>::new(call_retour, repl_a as Target) }.expect("retour new");
    // SAFETY: as above; no other thread runs `call_retour`.
    unsafe { retour.enable() }.expect("retour enable");
    assert_eq!(call(call_retour, 1), repl_a(1));

    g.bench_function("direct", |b| b.iter(|| call(call_direct, 7)));
    g.bench_function("direct-replacement", |b| b.iter(|| call(repl_a, 7)));
    g.bench_function("ours-hooked", |b| b.iter(|| call(call_ours, 7)));
    g.bench_function("retour-hooked", |b| b.iter(|| call(call_retour, 7)));
    g.bench_function("ours-hooked-disabled", |b| {
        b.iter(|| call(call_ours_disabled, 7))
    });

    let original = ours.original();
    let expected = 7u64
        .wrapping_mul(0x1b87_3593)
        .wrapping_add(0x1b87_3593 >> 7);
    assert_eq!(call(original, 7), expected);
    assert_ne!(retour.call(7), repl_a(7));
    g.bench_function("ours-original", |b| b.iter(|| call(original, 7)));
    g.bench_function("retour-call", |b| {
        b.iter(|| black_box(&retour).call(black_box(7)))
    });
    g.finish();

    // SAFETY: no other thread runs `call_retour`.
    unsafe { retour.disable() }.expect("retour disable");
    drop(retour);
    drop(ours);
    drop(ours_disabled);
}

fn bench_swap(c: &mut Criterion) {
    let mut g = c.benchmark_group("swap");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);

    let mut hook = Hook::install(swap_ours as Target, repl_a as Target).expect("install");
    let mut flip = false;
    g.bench_function("ours-swap", |b| {
        b.iter(|| {
            flip = !flip;
            let next = if flip { repl_b } else { repl_a };
            hook.swap(black_box(next as Target)).expect("swap")
        })
    });
    assert_eq!(call(swap_ours, 3), hook.swap(repl_a).expect("swap")(3));
    hook.remove().expect("remove");

    // SAFETY: same signature; no other thread runs `swap_retour_toggle`.
    let toggle = unsafe { GenericDetour::<Target>::new(swap_retour_toggle, repl_a as Target) }
        .expect("retour new");
    // SAFETY: no other thread runs `swap_retour_toggle`.
    unsafe { toggle.enable() }.expect("retour enable");
    g.bench_function("retour-disable-enable", |b| {
        b.iter(|| {
            // SAFETY: no other thread runs `swap_retour_toggle`.
            unsafe {
                toggle.disable().expect("retour disable");
                toggle.enable().expect("retour enable");
            }
        })
    });
    // SAFETY: as above.
    unsafe { toggle.disable() }.expect("retour disable");
    drop(toggle);

    let mut current: Option<GenericDetour<Target>> = None;
    let mut flip = false;
    g.bench_function("retour-recreate", |b| {
        b.iter(|| {
            if let Some(d) = current.take() {
                // SAFETY: no other thread runs `swap_retour_recreate`.
                unsafe { d.disable() }.expect("retour disable");
            }
            flip = !flip;
            let next = if flip { repl_b } else { repl_a };
            // SAFETY: same signature; the previous detour is disabled and
            // dropped; no other thread runs `swap_retour_recreate`.
            let d = unsafe { GenericDetour::<Target>::new(swap_retour_recreate, next as Target) }
                .expect("retour new");
            // SAFETY: as above.
            unsafe { d.enable() }.expect("retour enable");
            current = Some(d);
        })
    });
    if let Some(d) = current.take() {
        // SAFETY: no other thread runs `swap_retour_recreate`.
        unsafe { d.disable() }.expect("retour disable");
    }
    g.finish();
}

fn bench_install_remove(c: &mut Criterion) {
    let mut g = c.benchmark_group("install_remove");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);

    let cases: [(usize, Target, Target); 3] = [
        (0, ir_ours_0, ir_retour_0),
        (2, ir_ours_2, ir_retour_2),
        (8, ir_ours_8, ir_retour_8),
    ];
    for (n, ours_t, retour_t) in cases {
        // Ours: the busy threads call the target being patched.
        let busy = Busy::start(n, ours_t);
        eprintln!(
            "install_remove/ours/{n}: {} threads in the process",
            threads_now()
        );
        g.bench_function(BenchmarkId::new("ours", n), |b| {
            b.iter(|| {
                let mut h = Hook::install(ours_t, repl_a as Target).expect("install");
                h.remove().expect("remove");
                h
            })
        });
        busy.stop();

        // Retour: not safe with threads running the target, so they run
        // another function (same load, no hazard).
        let busy = Busy::start(n, busy_elsewhere);
        eprintln!(
            "install_remove/retour/{n}: {} threads in the process",
            threads_now()
        );
        g.bench_function(BenchmarkId::new("retour-busy-elsewhere", n), |b| {
            b.iter(|| {
                // SAFETY: same signature; no thread runs `retour_t` (the busy
                // ones run `busy_elsewhere`).
                let d = unsafe { GenericDetour::<Target>::new(retour_t, repl_a as Target) }
                    .expect("retour new");
                // SAFETY: as above.
                unsafe {
                    d.enable().expect("retour enable");
                    d.disable().expect("retour disable");
                }
                d
            })
        });
        busy.stop();
    }
    g.finish();
}

/// Where install+remove time goes: the pieces our cycle is made of that
/// the patcher exposes, measured alone.
fn bench_install_remove_parts(c: &mut Criterion) {
    let mut g = c.benchmark_group("install_remove_parts");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);

    // What install did on every call before PROCMAP_QUERY: read and parse
    // all of `/proc/self/maps`.
    g.bench_function("maps-read", |b| {
        b.iter(|| hotpatch_patcher::maps::read().expect("maps"))
    });
    // What it does now (Linux 6.11+): open the file and ask for the one
    // mapping holding an address.
    let here = bench_install_remove_parts as *const () as usize;
    g.bench_function("maps-query", |b| {
        b.iter(|| {
            hotpatch_patcher::maps::Lookup::new()
                .expect("lookup")
                .find(here)
                .expect("mapped")
        })
    });

    // What install and preflight add for the module-wide branch index once
    // it is built and cached: a registry lookup, the module record, a
    // `stat` of its file and the cache probe.
    let _ = hotpatch_patcher::x86_64::branches::module_of(here).expect("the bench binary");
    g.bench_function("module-index-cached", |b| {
        b.iter(|| hotpatch_patcher::x86_64::branches::module_of(here).expect("module"))
    });

    // One stop-the-world and release (install and remove each do one). The
    // patcher lock it wants is not taken: nothing else patches meanwhile.
    for n in [0, 2, 8] {
        let busy = Busy::start(n, busy_elsewhere);
        g.bench_function(BenchmarkId::new("world-stop-release", n), |b| {
            b.iter(|| {
                hotpatch_patcher::world::stop(Duration::from_secs(1))
                    .expect("stop")
                    .release()
            })
        });
        busy.stop();
    }
    g.finish();
}

/// What `criterion_group!` + `criterion_main!` expand to, written out so
/// that every item here is documented.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_call(&mut c);
    bench_swap(&mut c);
    bench_install_remove(&mut c);
    bench_install_remove_parts(&mut c);
    c.final_summary();
}
