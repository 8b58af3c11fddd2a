//! The SIGPROF handler's disposition and what its stack copies report.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hotpatch_profiler::{Clock, ProfilerBuilder};
use hotpatch_tests::load::thread_cpu;

static SAMPLER: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SAMPLER.lock().unwrap_or_else(|e| e.into_inner())
}

/// While the handler runs every other asynchronous signal is blocked: a
/// handler of another signal cannot interrupt a sample being written and
/// jump away (leaving its slot taken for good). Synchronous faults stay
/// deliverable (blocked, they would kill the process silently).
#[test]
fn the_handler_runs_with_other_signals_blocked() {
    let _g = serial();
    let session = ProfilerBuilder::new()
        .frequency(100)
        .clock(Some(Clock::ItimerProf))
        .start()
        .unwrap();
    let act = hotpatch_sys::signal::query_action(libc::SIGPROF).unwrap();
    let report = session.stop().unwrap();
    drop(report);
    // SAFETY: `act.sa_mask` is an initialized sigset_t (read from the
    // kernel); sigismember only reads it.
    let member = |s: i32| unsafe { libc::sigismember(&act.sa_mask, s) } == 1;
    for s in [
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGCHLD,
        libc::SIGRTMIN(),
        libc::SIGRTMIN() + 1,
        libc::SIGRTMAX(),
    ] {
        assert!(
            member(s),
            "signal {s} is not blocked in the SIGPROF handler"
        );
    }
    for s in [libc::SIGSEGV, libc::SIGBUS] {
        assert!(!member(s), "synchronous fault {s} is blocked");
    }
}

/// Recurses `depth` times through frames of 4 KiB, then spins for `cpu`
/// of this thread's CPU time.
#[inline(never)]
fn deep(depth: u32, cpu: Duration) -> u64 {
    let mut pad = [0u8; 4096];
    std::hint::black_box(&mut pad);
    if depth == 0 {
        let t0 = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() - t0 < cpu {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        return x + u64::from(pad[7]);
    }
    deep(depth - 1, cpu) + u64::from(pad[3])
}

/// A stack deeper than the 16 KiB a signal-clock handler copies is
/// reported: every sample taken at the bottom of a 64 KiB stack is a
/// truncated copy, and none is reported empty.
#[test]
fn truncated_stack_copies_are_counted() {
    let _g = serial();
    let session = ProfilerBuilder::new()
        .frequency(1000)
        .clock(Some(Clock::ItimerProf))
        .start()
        .unwrap();
    let spun = std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(|| deep(16, Duration::from_millis(600)))
        .unwrap()
        .join()
        .unwrap();
    std::hint::black_box(spun);
    let report = session.stop().unwrap();
    let s = &report.stats;
    println!(
        "samples {}, truncated {}, empty {}, unanchored {}",
        s.samples, s.truncated_stack_copies, s.empty_stack_copies, s.unanchored_samples
    );
    assert!(s.samples >= 50, "sampled: {}", s.samples);
    // The spinning thread's samples (most of the process's CPU time) are
    // all truncated copies.
    assert!(
        s.truncated_stack_copies * 2 >= s.samples,
        "truncated copies: {} of {}",
        s.truncated_stack_copies,
        s.samples
    );
    assert_eq!(s.empty_stack_copies, 0);
    assert_eq!(s.unanchored_samples, 0);
}
