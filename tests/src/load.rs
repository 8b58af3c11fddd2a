//! Helpers for tests that load the machine or need a thread's own clock.

use std::process::{Child, Command};
use std::time::Duration;

/// Busy child processes (`sh -c 'while :; do :; done'`), killed by their
/// own pids on drop: a CPU hog owned by one test.
#[derive(Debug)]
pub struct Hog(Vec<Child>);

impl Hog {
    /// `n` busy processes per core.
    ///
    /// # Panics
    /// When `sh` cannot be started.
    pub fn per_core(n: usize) -> Hog {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Hog((0..cores * n)
            .map(|_| {
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .expect("spawn a busy sh")
            })
            .collect())
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Turns the patcher's ptrace path off until dropped: a thread that blocks
/// the stop signal is then a straggler again (the int3 protocol's tests).
#[derive(Debug)]
pub struct PtraceOff(());

impl PtraceOff {
    /// Turns the ptrace path off.
    pub fn new() -> PtraceOff {
        hotpatch_patcher::world::set_ptrace_enabled(false);
        PtraceOff(())
    }
}

impl Default for PtraceOff {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PtraceOff {
    fn drop(&mut self) {
        hotpatch_patcher::world::set_ptrace_enabled(true);
    }
}
