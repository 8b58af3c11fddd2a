//! The accuracy program of issue #12: five busy functions on four threads
//! (busy 100%, 50%, 25%, and one alternating two functions 3:1), profiled,
//! with each thread's true CPU time from `CLOCK_THREAD_CPUTIME_ID`.
//!
//! `cargo run --release -p hotpatch-profiler --example accuracy -- [HZ] [SECONDS] [CLOCK]`
//! (CLOCK: auto, perf, timer, itimer, or `-`)
//! prints each function's share by CPU time and by profile, the worst error,
//! the profile's CPU total against the threads' and the delivered rate.
//! With `-` as CLOCK the profiler is not started (for `perf record`).

#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "example")]

use std::time::Duration;

use hotpatch_profiler::{Clock, ProfilerBuilder};

#[allow(dead_code, reason = "shared with tests/tests/profiler_accuracy.rs")]
mod workload;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let hz: i32 = args.get(1).map_or(999, |s| s.parse().unwrap());
    let secs: f64 = args.get(2).map_or(4.0, |s| s.parse().unwrap());
    let clock = match args.get(3).map(String::as_str) {
        None | Some("auto") => Some(None),
        Some("perf") => Some(Some(Clock::PerfEvent)),
        Some("timer") => Some(Some(Clock::ThreadTimer)),
        Some("itimer") => Some(Some(Clock::ItimerProf)),
        Some("-") => None,
        Some(o) => panic!("clock {o}?"),
    };
    let session = clock.map(|c| {
        ProfilerBuilder::new()
            .frequency(hz)
            .clock(c)
            .start()
            .unwrap()
    });
    let truth = workload::run(Duration::from_secs_f64(secs));
    let Some(session) = session else {
        workload::print_truth(&truth);
        return;
    };
    let report = session.stop().unwrap();
    let cmp = workload::compare(&report, &truth);
    println!("{cmp}");
    println!("stats: {:?}", report.stats);
}
