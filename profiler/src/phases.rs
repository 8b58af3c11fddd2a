//! Where the session's helper thread spends its CPU: per phase, the thread
//! CPU time (`CLOCK_THREAD_CPUTIME_ID`) and how many times it ran, summed
//! over every session since [`reset`]. The phases inside a drain
//! (`Modules`, `Unwind`, `Name`, `Accumulate`) are also counted when a
//! host thread drains (`checkpoint`, `stop`), outside any `Wake`. Off unless [`enable`]d (the
//! overhead bench turns it on for its `helper-phases` mode); when off, each
//! phase costs one relaxed load.
//!
//! Not a stable API: for the bench and for diagnosing overhead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A part of the helper's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// One whole wake of the helper (everything below, plus locking).
    Wake,
    /// Giving new threads their clock (`Clocks::sync`: the `fstat` of
    /// `/proc/self/task`, the listing when due, opening rings).
    Threads,
    /// Bringing framehop's module list up to the registry's.
    Modules,
    /// Draining the signal handlers' buffer (not the rings).
    Buffer,
    /// Draining every ring: parsing, unwinding, names, accumulating.
    Rings,
    /// Unwinding one ring sample (inside `Rings`).
    Unwind,
    /// Naming one sample's thread (inside `Rings`): a map lookup, and
    /// reading `/proc` when the name is not known or is due a re-read.
    Name,
    /// Adding one unwound sample to the epoch's map (inside `Rings`).
    Accumulate,
}

const N: usize = 8;
const ALL: [Phase; N] = [
    Phase::Wake,
    Phase::Threads,
    Phase::Modules,
    Phase::Buffer,
    Phase::Rings,
    Phase::Unwind,
    Phase::Name,
    Phase::Accumulate,
];

static ON: AtomicBool = AtomicBool::new(false);
static NS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static COUNT: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

/// Turns the counting on or off.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Zeroes every counter.
pub fn reset() {
    for i in 0..N {
        NS[i].store(0, Ordering::Relaxed);
        COUNT[i].store(0, Ordering::Relaxed);
    }
}

/// (phase, thread CPU nanoseconds, times run) for every phase.
pub fn snapshot() -> Vec<(Phase, u64, u64)> {
    ALL.iter()
        .enumerate()
        .map(|(i, &p)| {
            (
                p,
                NS[i].load(Ordering::Relaxed),
                COUNT[i].load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// This thread's CPU time in nanoseconds.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `f`, adding its thread CPU time to `phase` when counting is on.
#[inline]
pub(crate) fn time<T>(phase: Phase, f: impl FnOnce() -> T) -> T {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t = thread_cpu_ns();
    let r = f();
    let i = phase as usize;
    NS[i].fetch_add(thread_cpu_ns().saturating_sub(t), Ordering::Relaxed);
    COUNT[i].fetch_add(1, Ordering::Relaxed);
    r
}
