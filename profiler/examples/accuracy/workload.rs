//! The workload of the accuracy program (issue #12), shared by
//! `examples/accuracy` and `tests/tests/profiler_accuracy.rs`.
//!
//! Five busy functions on four threads: `busy_a` on a thread busy 100% of
//! the time, `busy_b` 50%, `busy_c` 25%, and `busy_d`/`busy_e` alternating
//! 3:1 on a fourth, busy thread. Every call's CPU time is measured with the
//! thread's `CLOCK_THREAD_CPUTIME_ID`: that is the truth a profile is
//! compared with.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hotpatch_profiler::Report;

/// The five functions, as their names end in a profile.
pub const FUNCTIONS: [&str; 5] = ["busy_a", "busy_b", "busy_c", "busy_d", "busy_e"];
/// The worker threads' names.
pub const THREADS: [&str; 4] = ["acc-100", "acc-50", "acc-25", "acc-3to1"];

/// This thread's CPU time.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Spins until this thread used `cpu` more CPU time; `x` keeps the work
/// from being optimized out. Each function is its own copy (a macro) so the
/// profile tells them apart.
macro_rules! busy {
    ($name:ident, $mul:expr) => {
        #[inline(never)]
        pub fn $name(cpu: Duration, mut x: u64) -> u64 {
            let end = thread_cpu() + cpu;
            while thread_cpu() < end {
                for _ in 0..20_000 {
                    x = std::hint::black_box(x.wrapping_mul($mul).rotate_left(7) ^ 0x9e37);
                }
            }
            x
        }
    };
}
busy!(busy_a, 0x5851_f42d_4c95_7f2d);
busy!(busy_b, 0x2545_f491_4f6c_dd1d);
busy!(busy_c, 0x9e37_79b9_7f4a_7c15);
busy!(busy_d, 0xbf58_476d_1ce4_e5b9);
busy!(busy_e, 0x94d0_49bb_1331_11eb);

/// What the threads measured: CPU time per function and per thread.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    /// Per function of [`FUNCTIONS`].
    pub per_function: [Duration; 5],
    /// Per thread of [`THREADS`], over the whole thread.
    pub per_thread: [Duration; 4],
}

fn worker(
    name: &'static str,
    stop: Arc<AtomicBool>,
    body: impl Fn(&mut [Duration; 5]) + Send + 'static,
) -> std::thread::JoinHandle<([Duration; 5], Duration)> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut per = [Duration::ZERO; 5];
            while !stop.load(Ordering::Relaxed) {
                body(&mut per);
            }
            (per, thread_cpu())
        })
        .expect("spawn worker")
}

/// Times one call of `f` on this thread's CPU clock into `slot`.
fn timed(slot: &mut Duration, f: impl FnOnce()) {
    let t = thread_cpu();
    f();
    *slot += thread_cpu() - t;
}

/// Runs the workload for `wall` and returns the truth.
pub fn run(wall: Duration) -> Truth {
    let stop = Arc::new(AtomicBool::new(false));
    let ms = Duration::from_millis(1);
    let handles = vec![
        worker(THREADS[0], Arc::clone(&stop), move |p| {
            timed(&mut p[0], || {
                std::hint::black_box(busy_a(4 * ms, 1));
            });
        }),
        worker(THREADS[1], Arc::clone(&stop), move |p| {
            timed(&mut p[1], || {
                std::hint::black_box(busy_b(2 * ms, 2));
            });
            std::thread::sleep(2 * ms);
        }),
        worker(THREADS[2], Arc::clone(&stop), move |p| {
            timed(&mut p[2], || {
                std::hint::black_box(busy_c(ms, 3));
            });
            std::thread::sleep(3 * ms);
        }),
        worker(THREADS[3], Arc::clone(&stop), move |p| {
            timed(&mut p[3], || {
                std::hint::black_box(busy_d(3 * ms, 4));
            });
            timed(&mut p[4], || {
                std::hint::black_box(busy_e(ms, 5));
            });
        }),
    ];
    let t = Instant::now();
    while t.elapsed() < wall {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let mut truth = Truth::default();
    for (i, h) in handles.into_iter().enumerate() {
        let (per, total) = h.join().expect("worker");
        for (acc, d) in truth.per_function.iter_mut().zip(per) {
            *acc += d;
        }
        truth.per_thread[i] = total;
    }
    truth
}

/// Prints the truth alone (when another profiler, e.g. `perf record`,
/// sampled the run).
pub fn print_truth(t: &Truth) {
    let total: Duration = t.per_function.iter().sum();
    for (f, d) in FUNCTIONS.iter().zip(t.per_function) {
        println!(
            "{f}: cpu {:.3}s share {:.2}%",
            d.as_secs_f64(),
            100.0 * d.as_secs_f64() / total.as_secs_f64()
        );
    }
    let threads: Duration = t.per_thread.iter().sum();
    println!("worker threads' CPU: {:.3}s", threads.as_secs_f64());
}

/// A profile against the truth.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Per function: (name, true share %, profile share %).
    pub rows: Vec<(&'static str, f64, f64)>,
    /// The largest |profile share - true share|, percentage points.
    pub worst_pp: f64,
    /// CPU time in the profile on the worker threads (seconds).
    pub profile_cpu: f64,
    /// The worker threads' measured CPU time (seconds).
    pub true_cpu: f64,
    /// Samples on the worker threads per CPU-second.
    pub rate: f64,
    /// Samples on the worker threads.
    pub samples: u64,
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, t, p) in &self.rows {
            writeln!(
                f,
                "{n}: true {t:6.2}%  profile {p:6.2}%  error {:+.2} pp",
                p - t
            )?;
        }
        writeln!(f, "worst share error: {:.2} pp", self.worst_pp)?;
        writeln!(
            f,
            "CPU: profile {:.3}s, threads {:.3}s ({:+.1}%)",
            self.profile_cpu,
            self.true_cpu,
            100.0 * (self.profile_cpu / self.true_cpu - 1.0)
        )?;
        write!(
            f,
            "samples on the workers: {} = {:.0} per CPU-second",
            self.samples, self.rate
        )
    }
}

/// Compares `report` with `truth`: shares by CPU time (each sample's value)
/// of the stacks containing each function.
pub fn compare(report: &Report, truth: &Truth) -> Comparison {
    let mut per_fn = [0u64; 5];
    let (mut workers_ns, mut samples) = (0u64, 0u64);
    for s in &report.samples {
        if !THREADS.contains(&s.thread.as_str()) {
            continue;
        }
        workers_ns += s.value;
        samples += s.count;
        let names: Vec<String> = s
            .stack
            .iter()
            .flat_map(|&l| report.locations[l].function_names())
            .collect();
        if let Some(i) = FUNCTIONS
            .iter()
            .position(|f| names.iter().any(|n| n.ends_with(&format!("::{f}"))))
        {
            per_fn[i] += s.value;
        }
    }
    let prof_total: u64 = per_fn.iter().sum();
    let true_total: f64 = truth.per_function.iter().map(Duration::as_secs_f64).sum();
    let mut rows = Vec::new();
    let mut worst: f64 = 0.0;
    for (i, name) in FUNCTIONS.iter().enumerate() {
        let t = 100.0 * truth.per_function[i].as_secs_f64() / true_total;
        let p = 100.0 * per_fn[i] as f64 / (prof_total.max(1)) as f64;
        worst = worst.max((p - t).abs());
        rows.push((*name, t, p));
    }
    let true_cpu: f64 = truth.per_thread.iter().map(Duration::as_secs_f64).sum();
    Comparison {
        rows,
        worst_pp: worst,
        profile_cpu: workers_ns as f64 / 1e9,
        true_cpu,
        rate: samples as f64 / true_cpu,
        samples,
    }
}
