//! Profiles that tell the truth (issue #12): per-thread sampling clocks,
//! CPU time in the profile equal to the CPU time spent, exact addresses.
//!
//! * `shares_and_cpu_total_match_the_threads_cpu_clocks_under_a_cpu_hog`:
//!   the accuracy program (`profiler/examples/accuracy/workload.rs`: five
//!   busy functions, threads busy 100%/50%/25%, one alternating two
//!   functions 3:1) profiled 4 s at 999 Hz while this test runs a CPU hog
//!   of two busy processes per core. Truth: each thread's
//!   `CLOCK_THREAD_CPUTIME_ID` around every call. Verdicts are ratios of
//!   CPU times, never wall-clock durations.
//! * `a_thread_started_after_start_is_sampled`.
//! * `samples_in_two_lines_of_one_function_stay_apart`: the report and
//!   `go tool pprof -lines` attribute samples to both lines.
//!
//! The default clock is `perf-ring` (issue #12), whose own copies of these
//! tests are in `profiler_ring.rs`; these run the signal clock
//! (`perf-event`, or the thread CPU timer where `perf_event_open` is
//! refused), so both sampling paths are held to the same numbers.
//!
//! The sampler is process-wide: the tests take turns.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hotpatch_profiler::{Clock, ProfilerBuilder};
use hotpatch_tests::load::Hog;
use hotpatch_tests::loader_fixtures::TempDir;

#[path = "../../profiler/examples/accuracy/workload.rs"]
#[allow(dead_code, reason = "shared with the example")]
mod workload;

use workload::thread_cpu;

static SERIAL: Mutex<()> = Mutex::new(());

/// A builder on the signal clock: `perf-event` where `perf_event_open`
/// works, else the thread CPU timer.
fn signal_clock() -> ProfilerBuilder {
    let clock = match ProfilerBuilder::new().clock(Some(Clock::PerfEvent)).start() {
        Ok(s) => {
            drop(s.stop());
            Clock::PerfEvent
        }
        Err(_) => Clock::ThreadTimer,
    };
    ProfilerBuilder::new().clock(Some(clock))
}

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn shares_and_cpu_total_match_the_threads_cpu_clocks_under_a_cpu_hog() {
    let _s = serial();
    let hog = Hog::per_core(2);
    let session = signal_clock().frequency(999).start().unwrap();
    let clock = session.clock();
    let truth = workload::run(Duration::from_secs(4));
    let report = session.stop().unwrap();
    drop(hog);
    let cmp = workload::compare(&report, &truth);
    println!("clock: {clock}\n{cmp}\nstats: {:?}", report.stats);
    assert_eq!(report.stats.clock, Some(clock));
    assert_ne!(
        clock,
        Clock::ItimerProf,
        "a per-thread clock works here (perf_event_open or timer_create)"
    );
    assert!(cmp.samples > 100, "the workers were sampled: {cmp}");
    assert!(
        cmp.worst_pp <= 2.0,
        "worst share error {:.2} pp > 2 pp:\n{cmp}",
        cmp.worst_pp
    );
    let ratio = cmp.profile_cpu / cmp.true_cpu;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "profile CPU {:.3}s vs the threads' {:.3}s:\n{cmp}",
        cmp.profile_cpu,
        cmp.true_cpu
    );
}

#[inline(never)]
fn late_thread_work(x: u64) -> u64 {
    let mut x = x;
    for _ in 0..10_000 {
        x = std::hint::black_box(x.wrapping_mul(0x9e37_79b9).rotate_left(5));
    }
    x
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

#[test]
fn a_thread_started_after_start_is_sampled() {
    let _s = serial();
    let session = signal_clock().frequency(999).start().unwrap();
    if session.clock() == Clock::ItimerProf {
        // The process-wide timer samples every thread; nothing to give.
        println!("clock: itimer-prof (no per-thread clocks here)");
    }
    let per_thread = session.clock() != Clock::ItimerProf;
    // Each thread spins until it has its own clock, then uses 100 ms of CPU
    // under it: at 999 Hz, ~100 periods. It reports the CPU time it used
    // before its clock came (what a new thread's first moments lose).
    let lost: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let session = &session;
                std::thread::Builder::new()
                    .name(format!("late-{i}"))
                    .spawn_scoped(s, move || {
                        let me = gettid();
                        let mut x = 1;
                        let mut before = None;
                        loop {
                            if before.is_none()
                                && (!per_thread || session.clocked_threads().contains(&me))
                            {
                                before = Some(thread_cpu());
                            }
                            if before.is_some_and(|b| thread_cpu() - b > Duration::from_millis(100))
                            {
                                break;
                            }
                            x = late_thread_work(x);
                        }
                        std::hint::black_box(x);
                        before.unwrap()
                    })
                    .unwrap()
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let report = session.stop().unwrap();
    let mut sorted = lost.clone();
    sorted.sort();
    println!(
        "CPU used before the clock came, 8 threads: median {:?}, max {:?}",
        sorted[4], sorted[7]
    );
    for i in 0..8 {
        let name = format!("late-{i}");
        let n: u64 = report
            .samples
            .iter()
            .filter(|s| s.thread == name)
            .filter(|s| {
                s.stack.iter().any(|&l| {
                    report.locations[l]
                        .function_names()
                        .iter()
                        .any(|f| f.ends_with("late_thread_work"))
                })
            })
            .map(|s| s.count)
            .sum();
        println!("{name}: {n} samples in late_thread_work");
        assert!(n > 0, "{name}, started after start(), was sampled");
    }
}

static LINE_A: AtomicU32 = AtomicU32::new(0);
static LINE_B: AtomicU32 = AtomicU32::new(0);

/// Two loops on two lines of one function, the second twice as long.
#[rustfmt::skip]
#[inline(never)]
fn two_lines(n: u64) -> u64 {
    let (mut x, mut y) = (1u64, 2u64);
    LINE_A.store(line!() + 1, Ordering::Relaxed);
    for _ in 0..n { x = std::hint::black_box(x.wrapping_mul(3) ^ 5); }
    LINE_B.store(line!() + 1, Ordering::Relaxed);
    for _ in 0..2 * n { y = std::hint::black_box(y.wrapping_mul(7).rotate_left(3)); }
    x ^ y
}

#[test]
fn samples_in_two_lines_of_one_function_stay_apart() {
    let _s = serial();
    let session = signal_clock().frequency(999).start().unwrap();
    let t = thread_cpu();
    let mut x = 0;
    while thread_cpu() - t < Duration::from_millis(600) {
        x ^= two_lines(10_000);
    }
    std::hint::black_box(x);
    let report = session.stop().unwrap();
    let (a, b) = (
        LINE_A.load(Ordering::Relaxed),
        LINE_B.load(Ordering::Relaxed),
    );
    // The report: leaf locations in `two_lines`, by line.
    let (mut at_a, mut at_b) = (0u64, 0u64);
    for s in &report.samples {
        let leaf = &report.locations[s.stack[0]];
        let Some(f) = leaf.frames.iter().find(|f| {
            f.function
                .as_deref()
                .is_some_and(|n| n.ends_with("two_lines"))
        }) else {
            continue;
        };
        if f.line == Some(a) {
            at_a += s.count;
        } else if f.line == Some(b) {
            at_b += s.count;
        }
    }
    println!("samples at line {a}: {at_a}, at line {b}: {at_b}");
    assert!(at_a > 0 && at_b > 0, "both lines sampled: {at_a} / {at_b}");
    assert!(
        at_b > at_a,
        "the loop doing twice the work has more samples: {at_a} / {at_b}"
    );

    let dir = TempDir::new("prof-lines");
    let pb = dir.join("lines.pb.gz");
    report
        .write_pprof(std::fs::File::create(&pb).unwrap())
        .unwrap();
    let Some(out) = go_pprof(&["-top", "-lines", "-symbolize=none", pb.to_str().unwrap()]) else {
        return;
    };
    println!("{out}");
    for line in [a, b] {
        let want = format!("profiler_accuracy.rs:{line}");
        assert!(
            out.lines()
                .any(|l| l.contains("two_lines") && l.contains(&want)),
            "go tool pprof -lines shows {want} in two_lines:\n{out}"
        );
    }
    assert!(
        out.contains("Total samples") || out.contains("Showing nodes"),
        "{out}"
    );
}

fn go_pprof(args: &[&str]) -> Option<String> {
    if Command::new("go").arg("version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "go is required in CI (.ci/run installs golang-go)"
        );
        eprintln!("SKIP: `go` not installed (apt-get install golang-go)");
        return None;
    }
    let out = Command::new("go")
        .arg("tool")
        .arg("pprof")
        .args(args)
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}
