//! The ptrace path of the stop-the-world (issue #17): install + remove with
//! 0 / 2 / 8 threads that block every signal (stopped with ptrace by a
//! helper process) beside 2 busy threads that take the stop signal; all of
//! them call the target being patched. Also its parts: one
//! `world::stop` + `release`, and starting + reaping the helper alone.
//!
//! ```text
//! cargo bench -p hotpatch-patcher --bench ptrace
//! ```

use std::ffi::{c_int, c_void};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use hotpatch_patcher::Hook;

/// The signature of every target and replacement here.
type Target = extern "C" fn(u64) -> u64;

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
    /// install_remove with 0 blocking threads.
    t0 = 0x27d4_eb2f;
    /// install_remove with 2 blocking threads.
    t2 = 0x3c6e_f372;
    /// install_remove with 8 blocking threads.
    t8 = 0x6a09_e667;
    /// stop_release (never patched).
    ts = 0x510e_527f;
}

/// A trivial replacement.
#[inline(never)]
extern "C" fn repl(x: u64) -> u64 {
    x ^ 0x5a
}

/// Threads calling `f` in a loop, `yield_now` every 1024 calls; with
/// `block`, each blocks every signal first.
struct Busy {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<u64>>,
}

impl Busy {
    fn start(n: usize, f: Target, block: bool) -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicUsize::new(0));
        let handles = (0..n)
            .map(|i| {
                let (stop, running) = (stop.clone(), running.clone());
                std::thread::spawn(move || {
                    // Every signal blocked on this thread, for its life.
                    let _mask = block.then(|| {
                        hotpatch_sys::signal::MaskGuard::block_all().expect("block every signal")
                    });
                    let mut acc = i as u64;
                    let mut first = true;
                    loop {
                        for _ in 0..1024 {
                            acc = black_box(f)(black_box(acc));
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

fn bench_install_remove(c: &mut Criterion) {
    let mut g = c.benchmark_group("install_remove_blocking");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    for (n, t) in [(0usize, t0 as Target), (2, t2), (8, t8)] {
        let busy = Busy::start(2, t, false);
        let blocking = Busy::start(n, t, true);
        let before = hotpatch_patcher::stats();
        g.bench_function(BenchmarkId::new("2-busy", n), |b| {
            b.iter(|| {
                let mut h = Hook::install(t, repl as Target).expect("install");
                h.remove().expect("remove");
                h
            })
        });
        let after = hotpatch_patcher::stats();
        eprintln!(
            "install_remove_blocking/{n}: {} ptrace stops over {} stops",
            after.ptrace_stops - before.ptrace_stops,
            after.stops - before.stops
        );
        blocking.stop();
        busy.stop();
    }
    g.finish();
}

/// One stop + release, through the install path's public pieces: a hook is
/// kept installed so the stop signal exists, then `world::stop` directly.
fn bench_stop_release(c: &mut Criterion) {
    let mut g = c.benchmark_group("stop_release_blocking");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    let mut warm = Hook::install(ts as Target, repl as Target).expect("warm-up");
    warm.remove().expect("warm-up remove");
    for n in [0usize, 2, 8] {
        let busy = Busy::start(2, ts, false);
        let blocking = Busy::start(n, ts, true);
        let mut stragglers = 0;
        let mut stops = 0;
        g.bench_function(BenchmarkId::new("2-busy", n), |b| {
            b.iter(|| {
                let s = hotpatch_patcher::world::stop(Duration::from_millis(200)).expect("stop");
                stragglers += s.straggler_count;
                stops += 1;
                s.release();
            })
        });
        eprintln!("stop_release_blocking/{n}: {stragglers} stragglers over {stops} stops");
        blocking.stop();
        busy.stop();
    }
    // The cost the ptrace path adds to every stop: reading each thread's
    // status. Same stop, 2 busy threads, ptrace path off (no status read).
    let busy = Busy::start(2, ts, false);
    hotpatch_patcher::world::set_ptrace_enabled(false);
    g.bench_function(BenchmarkId::new("2-busy-ptrace-off", 0), |b| {
        b.iter(|| {
            let s = hotpatch_patcher::world::stop(Duration::from_millis(200)).expect("stop");
            s.release();
        })
    });
    hotpatch_patcher::world::set_ptrace_enabled(true);
    busy.stop();
    g.finish();
}

static HELPER_STACK: hotpatch_sys::helper::HelperStack = hotpatch_sys::helper::HelperStack::new();

extern "C" fn nothing(_: *mut c_void) -> c_int {
    0
}

/// Starting and reaping the helper process alone: the fixed cost of the
/// per-stop helper.
fn bench_helper(c: &mut Criterion) {
    let mut g = c.benchmark_group("ptrace_helper");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("spawn_and_reap", |b| {
        b.iter(|| {
            // SAFETY: `nothing` only returns.
            let mut h = unsafe {
                hotpatch_sys::helper::spawn(&HELPER_STACK, nothing, std::ptr::null_mut())
            }
            .expect("spawn");
            black_box(h.wait(10_000_000_000))
        })
    });
    g.bench_function("task_status_own_thread", |b| {
        let tid = hotpatch_sys::raw::gettid();
        b.iter(|| black_box(hotpatch_sys::status::task_status(black_box(tid))))
    });
    g.finish();
}

/// What `criterion_group!` + `criterion_main!` expand to.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_helper(&mut c);
    bench_stop_release(&mut c);
    bench_install_remove(&mut c);
    c.final_summary();
}
