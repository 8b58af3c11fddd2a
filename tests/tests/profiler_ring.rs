//! `Clock::PerfRing`: the kernel takes the samples into a ring per thread
//! (no signal per sample), the session's helper unwinds them with framehop
//! over the copied stacks.
//!
//! * `perf_ring_shares_and_cpu_total_match_the_threads_cpu_clocks_under_a_cpu_hog`:
//!   the accuracy program (`profiler/examples/accuracy/workload.rs`)
//!   profiled 4 s at 999 Hz under a CPU hog: worst share error ≤ 2 pp, CPU
//!   total within 10 % of the threads' `CLOCK_THREAD_CPUTIME_ID`.
//! * `perf_ring_samples_a_thread_started_after_start`.
//! * `perf_ring_over_the_mlock_budget_falls_back_per_thread`: in a child
//!   process as a user without `CAP_IPC_LOCK` (root drops to `nobody`) and
//!   `RLIMIT_MEMLOCK` 0, more threads than the perf mlock budget has rings
//!   for: the session still runs on perf-ring, threads beyond the budget
//!   are sampled by a fallback clock (counted), every thread is sampled.
//! * `perf_ring_keeps_two_lines_of_one_function_apart`.
//! * `perf_ring_names_and_unwinds_through_an_unloaded_plugin_and_a_patch`:
//!   samples in a dlopen'ed plugin unloaded before the report are named and
//!   their stacks continue into the test's caller (the ring was drained and
//!   unwound at the unload's checkpoint); samples in a patched function's
//!   original body, reached through its trampoline, unwind into the
//!   replacement and its caller.
//!
//! Verdicts are ratios of CPU times and counts of samples over a fixed
//! amount of CPU time, never wall-clock durations. The sampler is
//! process-wide: the tests take turns.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hotpatch_loader::{Policy, load};
use hotpatch_patcher::Hook;
use hotpatch_profiler::{Clock, ProfilerBuilder, Report};
use hotpatch_symbolizer::Registry;
use hotpatch_tests::fixtures;
use hotpatch_tests::load::Hog;
use hotpatch_tests::loader_fixtures::{child_role, run_child};

#[path = "../../profiler/examples/accuracy/workload.rs"]
#[allow(dead_code, reason = "shared with the example")]
mod workload;

use workload::thread_cpu;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn ring() -> ProfilerBuilder {
    ProfilerBuilder::new()
        .frequency(999)
        .clock(Some(Clock::PerfRing))
}

#[test]
fn perf_ring_shares_and_cpu_total_match_the_threads_cpu_clocks_under_a_cpu_hog() {
    let _s = serial();
    let hog = Hog::per_core(2);
    let session = ring().start().unwrap();
    assert_eq!(session.clock(), Clock::PerfRing);
    let truth = workload::run(Duration::from_secs(4));
    let report = session.stop().unwrap();
    drop(hog);
    let cmp = workload::compare(&report, &truth);
    println!("clock: perf-ring\n{cmp}\nstats: {:?}", report.stats);
    assert_eq!(report.stats.clock, Some(Clock::PerfRing));
    assert_eq!(
        report.stats.thread_clock_fallbacks, 0,
        "every thread got a ring: {:?}",
        report.stats
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
fn perf_ring_samples_a_thread_started_after_start() {
    let _s = serial();
    let session = ring().start().unwrap();
    // Each thread spins until it has its own ring, then uses 100 ms of CPU
    // under it: at 999 Hz, ~100 periods.
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let session = &session;
                std::thread::Builder::new()
                    .name(format!("ring-late-{i}"))
                    .spawn_scoped(s, move || {
                        let me = gettid();
                        let mut x = 1;
                        let mut before = None;
                        loop {
                            if before.is_none() && session.clocked_threads().contains(&me) {
                                before = Some(thread_cpu());
                            }
                            if before.is_some_and(|b| thread_cpu() - b > Duration::from_millis(100))
                            {
                                break;
                            }
                            x = late_thread_work(x);
                        }
                        std::hint::black_box(x);
                    })
                    .unwrap()
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
    let report = session.stop().unwrap();
    for i in 0..4 {
        let name = format!("ring-late-{i}");
        let n: u64 = report
            .samples
            .iter()
            .filter(|s| s.thread == name)
            .filter(|s| stack_has(&report, s, "late_thread_work"))
            .map(|s| s.count)
            .sum();
        println!("{name}: {n} samples in late_thread_work");
        assert!(n > 0, "{name}, started after start(), was sampled");
    }
}

/// See the module doc. The verdict is the child's exit status; the child
/// is this test binary running this test alone in the "mlock" role
/// (`loader_fixtures::run_child`).
#[test]
fn perf_ring_over_the_mlock_budget_falls_back_per_thread() {
    if child_role().is_some() {
        over_the_mlock_budget_child();
        return;
    }
    let out = run_child(
        "perf_ring_over_the_mlock_budget_falls_back_per_thread",
        "mlock",
        |_| {},
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the child failed: {text}");
    assert!(text.contains("1 passed"), "the child ran no test: {text}");
}

#[inline(never)]
fn budget_thread_work(x: u64) -> u64 {
    let mut x = x;
    for _ in 0..10_000 {
        x = std::hint::black_box(x.wrapping_mul(0x9e37_79b9).rotate_left(7));
    }
    x
}

fn over_the_mlock_budget_child() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to plain data; lowering a limit needs no
    // privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &zero) }, 0);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root has CAP_IPC_LOCK, which lifts the budget: become a user of
        // this child's own (the budget is per user, so not `nobody`, whom
        // another run of the suite on this machine could be using at the
        // same moment), a uid no account has. glibc applies the ids to
        // every thread of the process.
        let id = 3_000_000 + std::process::id() % 1_000_000;
        println!("running as uid {id}");
        // SAFETY: setgroups with an empty list, then the ids; no pointers
        // but the null list of length 0.
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
            assert_eq!(libc::setresgid(id, id, id), 0);
            assert_eq!(libc::setresuid(id, id, id), 0);
        }
    }
    // perf_event_paranoid -1 lifts the budget for everyone (nothing falls
    // back, which this test cannot then show); at 3 and above (a Debian
    // patch) a user without CAP_PERFMON opens no perf event at all.
    let paranoid: i32 = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if !(0..=2).contains(&paranoid) {
        println!(
            "CODE=not-applicable perf_event_paranoid is {paranoid}: the mlock budget cannot be reached here"
        );
        return;
    }
    // The kernel's budget before RLIMIT_MEMLOCK: perf_event_mlock_kb per
    // online CPU. Enough threads that 1 MiB rings, and their 512 KiB
    // halves, cannot all fit.
    let kb: u64 = std::fs::read_to_string("/proc/sys/kernel/perf_event_mlock_kb")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u64;
    let n = (kb * cpus / 512 + 4) as usize;
    println!("budget {kb} KiB x {cpus} CPUs: {n} threads");
    let go = std::sync::Barrier::new(n + 1);
    let session = ProfilerBuilder::new()
        .frequency(1000)
        .clock(Some(Clock::PerfRing));
    let report = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let go = &go;
                std::thread::Builder::new()
                    .name(format!("mlock-{i}"))
                    .spawn_scoped(s, move || {
                        go.wait();
                        // 100 ms of this thread's CPU, ~100 periods.
                        let t = thread_cpu();
                        let mut x = 1;
                        while thread_cpu() - t < Duration::from_millis(100) {
                            x = budget_thread_work(x);
                        }
                        std::hint::black_box(x);
                    })
                    .unwrap()
            })
            .collect();
        // Every thread exists now: start() gives each its clock.
        let session = session.start().unwrap();
        assert_eq!(session.clock(), Clock::PerfRing);
        go.wait();
        for h in hs {
            h.join().unwrap();
        }
        session.stop().unwrap()
    });
    println!("{:?}", report.stats);
    assert_eq!(report.stats.clock, Some(Clock::PerfRing));
    assert!(
        report.stats.thread_clock_fallbacks >= 1,
        "no thread fell back: the budget was not reached ({n} threads)"
    );
    for i in 0..n {
        let name = format!("mlock-{i}");
        let got: u64 = report
            .samples
            .iter()
            .filter(|s| s.thread == name)
            .filter(|s| stack_has(&report, s, "budget_thread_work"))
            .map(|s| s.count)
            .sum();
        assert!(got > 0, "{name} was not sampled");
    }
}

fn stack_has(r: &Report, s: &hotpatch_profiler::Sample, f: &str) -> bool {
    s.stack.iter().any(|&l| {
        r.locations[l]
            .function_names()
            .iter()
            .any(|n| n.ends_with(f))
    })
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
fn perf_ring_keeps_two_lines_of_one_function_apart() {
    let _s = serial();
    let session = ring().start().unwrap();
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
    // The callers were unwound: two_lines' samples reach this test.
    let deep: u64 = report
        .samples
        .iter()
        .filter(|s| stack_has(&report, s, "two_lines"))
        .filter(|s| {
            stack_has(
                &report,
                s,
                "perf_ring_keeps_two_lines_of_one_function_apart",
            )
        })
        .map(|s| s.count)
        .sum();
    assert!(
        deep * 10 >= (at_a + at_b) * 9,
        "{deep} of {} samples in two_lines unwound into the test",
        at_a + at_b
    );
}

/// Calls the plugin's burn for `cpu` of this thread's CPU time.
#[inline(never)]
fn plugin_caller(f: &dyn Fn(u64) -> u64, cpu: Duration) {
    let t = thread_cpu();
    while thread_cpu() - t < cpu {
        std::hint::black_box(f(20_000));
    }
}

#[inline(never)]
extern "C" fn ring_hooked_target(x: u64) -> u64 {
    let mut x = x;
    for _ in 0..200 {
        x = std::hint::black_box(x.wrapping_mul(3) ^ (x >> 7));
    }
    x
}

static ORIGINAL: AtomicUsize = AtomicUsize::new(0);

#[inline(never)]
extern "C" fn ring_hooked_replacement(x: u64) -> u64 {
    let orig = ORIGINAL.load(Ordering::Relaxed);
    let f: extern "C" fn(u64) -> u64 = if orig == 0 {
        ring_hooked_target
    } else {
        // SAFETY: a non-zero ORIGINAL is the hook's `original()`, the
        // trampoline of an `extern "C" fn(u64) -> u64`.
        unsafe { std::mem::transmute::<usize, extern "C" fn(u64) -> u64>(orig) }
    };
    f(x).wrapping_add(1)
}

#[inline(never)]
fn patch_caller(f: extern "C" fn(u64) -> u64, cpu: Duration) {
    let t = thread_cpu();
    let mut x = 1;
    while thread_cpu() - t < cpu {
        x = f(std::hint::black_box(x));
    }
    std::hint::black_box(x);
}

#[test]
fn perf_ring_names_and_unwinds_through_an_unloaded_plugin_and_a_patch() {
    let _s = serial();
    let gone_so = fixtures::plugin("prof-gone");
    Registry::global().refresh().unwrap();
    let session = ring().start().unwrap();
    let gone = load(&gone_so, &Policy::new()).unwrap();
    {
        // SAFETY: the fixture exports it as `extern "C" fn(u64) -> u64`.
        let g = unsafe { gone.get::<extern "C" fn(u64) -> u64>("prof_gone_burn") }.unwrap();
        plugin_caller(&|n| g.call(n), Duration::from_millis(400));
    }
    let before = session.checkpoints();
    gone.unload().map_err(|r| r.to_string()).unwrap();
    assert!(session.checkpoints() > before, "the unload checkpointed");

    let target: extern "C" fn(u64) -> u64 = ring_hooked_target;
    let mut hook = Hook::install(target, ring_hooked_replacement as extern "C" fn(u64) -> u64)
        .expect("install hook");
    ORIGINAL.store(hook.original() as usize, Ordering::Relaxed);
    patch_caller(std::hint::black_box(target), Duration::from_millis(400));
    hook.remove().unwrap();
    let report = session.stop().unwrap();
    println!("{}", report.top(15));
    println!("stats: {:?}", report.stats);
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    let count = |pred: &dyn Fn(&hotpatch_profiler::Sample) -> bool| -> u64 {
        report
            .samples
            .iter()
            .filter(|s| pred(s))
            .map(|s| s.count)
            .sum()
    };
    let in_plugin = count(&|s| stack_has(&report, s, "prof_gone_burn"));
    let through_plugin = count(&|s| {
        stack_has(&report, s, "prof_gone_burn") && stack_has(&report, s, "plugin_caller")
    });
    println!("prof_gone_burn: {in_plugin} samples, {through_plugin} unwound into plugin_caller");
    assert!(in_plugin > 50, "the unloaded plugin's function was named");
    assert!(
        through_plugin * 10 >= in_plugin * 9,
        "stacks continue out of the unloaded plugin: {through_plugin} of {in_plugin}"
    );

    let in_target = count(&|s| stack_has(&report, s, "ring_hooked_target"));
    let through_patch = count(&|s| {
        stack_has(&report, s, "ring_hooked_target")
            && stack_has(&report, s, "ring_hooked_replacement")
            && stack_has(&report, s, "patch_caller")
    });
    println!(
        "ring_hooked_target: {in_target} samples, {through_patch} unwound through the replacement"
    );
    assert!(in_target > 20, "the patched function's body was sampled");
    assert!(
        through_patch * 10 >= in_target * 9,
        "stacks continue through the trampoline's callee into the replacement: \
         {through_patch} of {in_target}"
    );
}
