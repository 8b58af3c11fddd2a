//! Counters of what install and remove did, for tests and reports.

use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) static STOPS: AtomicU64 = AtomicU64::new(0);
pub(crate) static FIXUPS_FORWARD: AtomicU64 = AtomicU64::new(0);
pub(crate) static FIXUPS_BACKWARD: AtomicU64 = AtomicU64::new(0);
pub(crate) static INT3_WRITES: AtomicU64 = AtomicU64::new(0);
pub(crate) static REFUSED_UNSTOPPABLE: AtomicU64 = AtomicU64::new(0);
pub(crate) static PTRACE_STOPS: AtomicU64 = AtomicU64::new(0);
pub(crate) static PTRACE_HELPERS: AtomicU64 = AtomicU64::new(0);
pub(crate) static REFUSED_PTRACE: AtomicU64 = AtomicU64::new(0);
pub(crate) static PTRACE_RESTARTS: AtomicU64 = AtomicU64::new(0);
pub(crate) static FRAME_FIXUPS: AtomicU64 = AtomicU64::new(0);

/// Process-wide counters since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Stop-the-world rounds.
    pub stops: u64,
    /// Threads moved from inside the overwritten bytes into a trampoline.
    pub fixups_forward: u64,
    /// Threads moved from a trampoline's relocated prologue back to the original.
    pub fixups_backward: u64,
    /// Code writes that used the int3 protocol (a thread could not be parked).
    pub int3_writes: u64,
    /// Installs/removes refused with `E_PATCH_THREAD_UNSTOPPABLE`.
    pub refused_unstoppable: u64,
    /// Threads stopped with ptrace (they blocked the stop signal).
    pub ptrace_stops: u64,
    /// ptrace helper processes started (at most one per stop).
    pub ptrace_helpers: u64,
    /// Installs/removes refused with `E_PATCH_PTRACE_DENIED`.
    pub refused_ptrace: u64,
    /// ptrace stops that caught a thread inside a restartable system call
    /// (its RIP is taken as the `syscall` instruction's, see world.rs).
    pub ptrace_restarts: u64,
    /// Saved RIPs moved inside signal frames on a stopped thread's stack
    /// (it was running a handler when stopped).
    pub frame_fixups: u64,
}

/// The current counters.
pub fn stats() -> Stats {
    Stats {
        stops: STOPS.load(Ordering::Relaxed),
        fixups_forward: FIXUPS_FORWARD.load(Ordering::Relaxed),
        fixups_backward: FIXUPS_BACKWARD.load(Ordering::Relaxed),
        int3_writes: INT3_WRITES.load(Ordering::Relaxed),
        refused_unstoppable: REFUSED_UNSTOPPABLE.load(Ordering::Relaxed),
        ptrace_stops: PTRACE_STOPS.load(Ordering::Relaxed),
        ptrace_helpers: PTRACE_HELPERS.load(Ordering::Relaxed),
        refused_ptrace: REFUSED_PTRACE.load(Ordering::Relaxed),
        ptrace_restarts: PTRACE_RESTARTS.load(Ordering::Relaxed),
        frame_fixups: FRAME_FIXUPS.load(Ordering::Relaxed),
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
