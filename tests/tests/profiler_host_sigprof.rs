//! A host that handles SIGPROF itself (its own profiler) keeps its
//! handler, and is still profiled: by the perf ring alone, which needs no
//! signal.
//!
//! The one test of this binary: it installs a SIGPROF handler of its own,
//! which would change what any test beside it sees.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hotpatch_profiler::{Clock, ProfilerBuilder};
use hotpatch_tests::load::thread_cpu;

static HOST_SIGPROFS: AtomicU64 = AtomicU64::new(0);

extern "C" fn host_handler(_: libc::c_int) {
    HOST_SIGPROFS.fetch_add(1, Ordering::Relaxed);
}

#[inline(never)]
fn host_sigprof_burn(cpu: Duration) -> u64 {
    let end = thread_cpu() + cpu;
    let mut x = 1u64;
    while thread_cpu() < end {
        for _ in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    x
}

#[test]
fn a_host_owning_sigprof_keeps_it_and_is_profiled_by_the_ring() {
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is
    // a valid disposition; `host_handler` only touches an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = host_handler as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGPROF, &sa, std::ptr::null_mut()), 0);
    }
    // A signal clock asked for by name is refused with the stable code.
    let e = ProfilerBuilder::new()
        .frequency(999)
        .clock(Some(Clock::PerfEvent))
        .start()
        .expect_err("a signal clock must be refused while the host owns SIGPROF");
    assert_eq!(e.code(), "E_PROF_SIGNAL_TAKEN", "{e}");

    // The default clock: the ring, alone.
    let session = ProfilerBuilder::new().frequency(999).start().unwrap();
    host_sigprof_burn(Duration::from_millis(300));
    let report = session.stop().unwrap();
    // SAFETY: reads the disposition into a zeroed out-struct.
    let still_ours = unsafe {
        let mut cur: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGPROF, std::ptr::null(), &mut cur);
        cur.sa_sigaction == host_handler as extern "C" fn(libc::c_int) as usize
    };
    println!(
        "clock {}, {} samples, skipped {:?}",
        report.clock, report.stats.samples, report.stats.clocks_skipped
    );
    assert!(still_ours, "the host's SIGPROF handler was replaced");
    assert_eq!(
        HOST_SIGPROFS.load(Ordering::Relaxed),
        0,
        "the host got SIGPROFs"
    );
    assert_eq!(report.clock, Clock::PerfRing);
    assert!(
        report
            .stats
            .clocks_skipped
            .iter()
            .any(|w| w.contains("SIGPROF is taken by the host")),
        "{:?}",
        report.stats.clocks_skipped
    );
    // ~300 samples of 300 ms of CPU at 999 Hz; a third is plenty to say
    // the ring sampled this thread (no timing verdict: CPU time, not wall).
    assert!(
        report.stats.samples >= 100,
        "{} samples",
        report.stats.samples
    );
    // The burning function is on the stack of most samples (the rest are
    // the test harness's own threads); ranked by flat samples it can fall
    // out of a top 5 behind its inlined-away callees (debug build), so its
    // cumulative share is what is checked.
    let burn = report
        .top_entries()
        .into_iter()
        .find(|e| e.function.contains("host_sigprof_burn"));
    let top = report.top(10);
    let cum = burn.as_ref().map_or(0, |e| e.cum);
    assert!(
        cum * 2 >= report.stats.samples,
        "host_sigprof_burn on {cum} of {} stacks\n{top}",
        report.stats.samples
    );
}
