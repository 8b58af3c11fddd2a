//! The per-thread sampling clocks' lifetime and limits.
//!
//! * `no_sigprof_after_stop_while_a_forked_child_holds_the_perf_fds`: a
//!   child forked (no exec) during a session holds copies of the perf
//!   event fds; after `stop()` the parent's thread must get no SIGPROF.
//!
//! Verdicts count signals and samples over a fixed amount of the thread's
//! own CPU time, never wall-clock time. The sampler is process-wide: the
//! tests take turns.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hotpatch_profiler::{Clock, ProfilerBuilder};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Spins until this thread has used `d` more CPU time.
fn burn(d: Duration) {
    let end = thread_cpu() + d;
    let mut x = 0u64;
    while thread_cpu() < end {
        for i in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
}

fn sigprof_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialize it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPROF);
        set
    }
}

/// Takes a pending SIGPROF of this thread (or the process), if any.
fn take_pending_sigprof() -> bool {
    let set = sigprof_set();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid set and timeout; a null siginfo is allowed.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) == libc::SIGPROF }
}

fn fork_check(clock: Clock) {
    let session = ProfilerBuilder::new()
        .frequency(999)
        .clock(Some(clock))
        .start()
        .unwrap();
    burn(Duration::from_millis(20));
    // SAFETY: the child only calls async-signal-safe functions (pause,
    // _exit) and is killed by its pid below.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
    if child == 0 {
        loop {
            // SAFETY: async-signal-safe; the parent SIGKILLs us.
            unsafe { libc::pause() };
        }
    }
    let report = session.stop().unwrap();
    assert_eq!(report.stats.clock, Some(clock));
    let set = sigprof_set();
    // SAFETY: blocks SIGPROF on this thread only.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // One raised before the block (delivered, or pending now) is not the
    // question.
    while take_pending_sigprof() {}
    burn(Duration::from_millis(300));
    let got = take_pending_sigprof();
    // SAFETY: undoes the block above; kills and reaps our own child.
    unsafe {
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    assert!(
        !got,
        "{clock}: SIGPROF arrived after stop() (300 ms of CPU; 999 Hz) while a forked child held the clocks"
    );
}

#[test]
fn no_sigprof_after_stop_while_a_forked_child_holds_the_perf_fds() {
    let _g = serial();
    fork_check(Clock::PerfEvent);
    fork_check(Clock::ThreadTimer);
}
