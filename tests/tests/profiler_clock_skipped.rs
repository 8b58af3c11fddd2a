//! Why the clocks tried before the session's one were skipped is kept in
//! the report (Stats, the text output and the pprof comments).
//!
//! The one test of this binary: it fills the process's file descriptor
//! table, which would disturb any test running beside it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use hotpatch_profiler::{Clock, ProfilerBuilder};

/// With no file descriptor left, the perf clocks (one fd per thread) are
/// skipped, each with its reason, and the thread timer runs.
#[test]
fn reasons_of_skipped_clocks_are_reported() {
    let probe = std::fs::File::open("/dev/null").unwrap();
    // A soft limit a little above the fds in use, restored at the end.
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    let low = libc::rlimit {
        rlim_cur: (probe.as_raw_fd() as libc::rlim_t + 256).min(old.rlim_cur),
        rlim_max: old.rlim_max,
    };
    // SAFETY: a valid rlimit, lowering only the soft limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    let mut held: Vec<OwnedFd> = Vec::new();
    loop {
        // SAFETY: dup of an fd we own; the result is checked before use.
        let fd = unsafe { libc::dup(probe.as_raw_fd()) };
        if fd < 0 {
            break;
        }
        // SAFETY: a fresh fd from dup, owned by nobody else.
        held.push(unsafe { OwnedFd::from_raw_fd(fd) });
        assert!(held.len() < 1 << 20, "no fd limit");
    }
    let started = ProfilerBuilder::new().frequency(100).start();
    drop(held);
    // SAFETY: the limit read above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);
    let session = started.expect("a clock that needs no fd");
    let report = session.stop().unwrap();
    let skipped = &report.stats.clocks_skipped;
    println!("clock {}, skipped {skipped:?}", report.clock);
    assert_eq!(report.clock, Clock::ThreadTimer);
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped[0].starts_with("perf-ring: "), "{skipped:?}");
    assert!(skipped[1].starts_with("perf-event: "), "{skipped:?}");
    assert!(
        report.top(3).contains("note: clock skipped: perf-ring: "),
        "{}",
        report.top(3)
    );
}
