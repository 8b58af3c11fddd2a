//! Profiler overhead and resolution time (bench binary, `harness = false`).
//!
//! `cargo bench -p hotpatch-profiler --bench overhead`
//!
//! Times are the process's CPU time (`CLOCK_PROCESS_CPUTIME_ID`: the
//! workload, the handlers it runs and the profiler's helper thread), which
//! other load on the machine does not inflate.
//!
//! * A fixed CPU-bound workload (`work`, ~0.5 s) timed with no profiler, with
//!   hotpatch at 99 Hz and 1000 Hz (including `stop()`'s resolution), and with
//!   pprof-rs alone at the same rates (including its own `report().build()`),
//!   interleaved, 7 rounds; medians reported.
//! * The same workload timed *while* a session runs (start and stop outside
//!   the timed span): the per-sample sampling cost alone.
//! * In `HOTPATCH_BENCH_ONLY=sampling` mode, also the *floor*: the same
//!   per-thread `perf_event_open` cpu-clock with its signal sent to the
//!   workload thread, but an empty handler and no profiler — what the
//!   kernel's signal delivery alone costs at each rate on this machine.
//! * In the same mode, `Clock::PerfRing` rows (the kernel takes the
//!   samples into a ring, the helper unwinds them): the workload thread's
//!   CPU and the process's (the helper's unwinding counts; a checkpoint
//!   inside the timed span drains what is left), and per stack copy size
//!   (8/16/32 KiB) the cost at 1 kHz and the share of samples whose stack
//!   reaches the root of a ~12 KiB deep call chain.
//! * In the same mode, the **perf peers**: this bench binary run as the
//!   child of `perf record -e cpu-clock:u -F <hz> --no-buildid` with `-g`
//!   (frame pointers) and `--call-graph dwarf,8192` (the peer of the
//!   perf-ring's stack copy; at 1 kHz also `dwarf,16384`, the ring's
//!   default), and bare (their baseline), in its
//!   `HOTPATCH_BENCH_ONLY=workload` mode, which runs `work` once and prints
//!   its thread's CPU time. Per peer: that workload thread's CPU against
//!   the bare child's, and perf's and the child's CPU together
//!   (`RUSAGE_CHILDREN`) against the bare child's. Skipped, with the
//!   reason printed, when `perf record` cannot run.
//! * `HOTPATCH_BENCH_ONLY=handler-parts`: at 1 kHz, the floor's handler
//!   doing each part of the sampler's handler (`gettid` + `prctl`, libgcc's
//!   unwind, a frame-pointer walk for comparison), with the handler body's
//!   own time per signal (median, `CLOCK_MONOTONIC` inside the handler):
//!   where a sample's user-space cost goes, apart from the kernel's.
//! * Resolution of a 100,000-sample profile: 100,000 distinct 8-deep stacks
//!   over this binary's own code, through `Report::from_raw_stacks`.

use std::time::{Duration, Instant};

use hotpatch_profiler::{Clock, ProfilerBuilder, Report};
use hotpatch_symbolizer::{DebugSearch, Registry};

#[inline(never)]
fn work(iters: u64) -> u64 {
    let mut x = 0x9e37_79b9u64;
    for i in 0..iters {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
        x ^= x >> 29;
    }
    std::hint::black_box(x)
}

const ITERS: u64 = 400_000_000;

/// The process's CPU time (every thread: the workload, the signal handlers
/// it runs, the profiler's helper thread).
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_PROCESS_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time `f` costs the process: on a machine shared with other work,
/// wall time would mostly measure the neighbours.
fn time(f: impl FnOnce()) -> Duration {
    let t = process_cpu();
    f();
    process_cpu() - t
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `HOTPATCH_BENCH_ONLY=workload`: the workload alone, for `perf record`
    // to record as its child (the peer rows of `sampling` mode). Prints the
    // workload thread's CPU time in nanoseconds.
    if std::env::var("HOTPATCH_BENCH_ONLY").as_deref() == Ok("workload") {
        let t0 = thread_cpu();
        work(ITERS);
        println!("workload_thread_ns {}", (thread_cpu() - t0).as_nanos());
        return;
    }
    Registry::global().refresh().ok();
    // `HOTPATCH_BENCH_ONLY=resolve` skips the sampling rounds (for profiling
    // the resolution alone).
    if std::env::var("HOTPATCH_BENCH_ONLY").as_deref() == Ok("resolve") {
        resolve_100k();
        return;
    }
    // `HOTPATCH_BENCH_ONLY=sampling`: the baseline and the sampling-only
    // rows, with the samples taken (per-sample cost = extra CPU / samples).
    // `HOTPATCH_BENCH_ONLY=ring-stack`: the perf-ring stack size rows alone.
    if std::env::var("HOTPATCH_BENCH_ONLY").as_deref() == Ok("ring-stack") {
        let b = median(
            (0..3)
                .map(|_| {
                    time(|| {
                        nested_root(ITERS);
                    })
                })
                .collect(),
        );
        println!("baseline (no profiler): {b:?}");
        ring_stack_sizes(b);
        return;
    }
    if std::env::var("HOTPATCH_BENCH_ONLY").as_deref() == Ok("handler-parts") {
        handler_parts();
        return;
    }
    if std::env::var("HOTPATCH_BENCH_ONLY").as_deref() == Ok("sampling") {
        sampling_only();
        return;
    }
    if std::env::var("HOTPATCH_BENCH_ONLY").as_deref() == Ok("ring") {
        ring_paired();
        return;
    }
    if std::env::var("HOTPATCH_BENCH_ONLY").as_deref() == Ok("helper-phases") {
        helper_phases();
        return;
    }
    let rounds = 7;
    let mut base = Vec::new();
    let mut ours = [Vec::new(), Vec::new()];
    let mut theirs = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        base.push(time(|| {
            work(ITERS);
        }));
        for (i, hz) in [99, 1000].into_iter().enumerate() {
            ours[i].push(time(|| {
                let s = ProfilerBuilder::new().frequency(hz).start().expect("start");
                work(ITERS);
                let r = s.stop().expect("stop");
                std::hint::black_box(r.stats.samples);
            }));
            theirs[i].push(time(|| {
                let g = pprof::ProfilerGuardBuilder::default()
                    .frequency(hz)
                    .build()
                    .expect("pprof");
                work(ITERS);
                let r = g.report().build().expect("build");
                std::hint::black_box(r.data.len());
            }));
        }
    }
    // Sampling only: the workload timed while a session runs, start and
    // stop (and so resolution) outside the timed span. This is the cost the
    // 0.5 % / 3 % goals are about; the rows above add the fixed costs.
    let mut ours_sampling = [Vec::new(), Vec::new()];
    let mut theirs_sampling = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, hz) in [99, 1000].into_iter().enumerate() {
            let s = ProfilerBuilder::new().frequency(hz).start().expect("start");
            ours_sampling[i].push(time(|| {
                work(ITERS);
            }));
            std::hint::black_box(s.stop().expect("stop").stats.samples);
            let g = pprof::ProfilerGuardBuilder::default()
                .frequency(hz)
                .build()
                .expect("pprof");
            theirs_sampling[i].push(time(|| {
                work(ITERS);
            }));
            drop(g);
        }
    }
    let b = median(base);
    println!("baseline (no profiler): {b:?}");
    for (i, hz) in [99, 1000].into_iter().enumerate() {
        let o = median(ours_sampling[i].clone());
        let t = median(theirs_sampling[i].clone());
        let pct = |d: Duration| (d.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0;
        println!(
            "{hz:>5} Hz sampling only: hotpatch {o:?} ({:+.2}%), pprof-rs {t:?} ({:+.2}%)",
            pct(o),
            pct(t)
        );
    }
    for (i, hz) in [99, 1000].into_iter().enumerate() {
        let o = median(ours[i].clone());
        let t = median(theirs[i].clone());
        let pct = |d: Duration| (d.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0;
        println!(
            "{hz:>5} Hz: hotpatch {o:?} ({:+.2}%), pprof-rs {t:?} ({:+.2}%)",
            pct(o),
            pct(t)
        );
    }

    resolve_100k();
}

/// Resolution of a 100,000-sample profile over this binary's code.
fn resolve_100k() {
    let start = main as *const () as u64;
    let seq = Registry::global().current_seq();
    let stacks: Vec<(Vec<u64>, u64)> = (0..100_000u64)
        .map(|i| {
            let stack = (0..8u64)
                .map(|d| {
                    start
                        .wrapping_sub(0x40_000)
                        .wrapping_add((i * 97 + d * 4099) % 0x80_000)
                })
                .collect();
            (stack, 1)
        })
        .collect();
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let r = Report::from_raw_stacks(stacks.clone(), seq, &DebugSearch::default());
        times.push(t.elapsed());
        std::hint::black_box(r.stats.locations);
    }
    println!(
        "resolve 100,000 samples (8 frames each): median {:?}",
        median(times)
    );
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Signals the floor's empty handler counted.
static FLOOR_SIGNALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn floor_handler(_: libc::c_int) {
    FLOOR_SIGNALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// What [`parts_handler`] does besides counting (the `handler-parts`
/// mode): [`PART_SYSCALLS`], [`PART_UNWIND`], [`PART_FP`].
static FLOOR_PARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// `gettid` and `prctl(PR_GET_NAME)`, as the sampler's handler does.
const PART_SYSCALLS: u32 = 1;
/// libgcc's `_Unwind_Backtrace` (backtrace-rs `trace_unsynchronized`), as
/// the sampler's handler does, its frames written to a buffer.
const PART_UNWIND: u32 = 2;
/// A frame-pointer walk from the interrupted context (rbp chain), for
/// comparison.
const PART_FP: u32 = 4;
/// The end of the main thread's stack mapping (`[stack]`), for the
/// frame-pointer walk's bound.
static STACK_TOP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The end address of `[stack]` in /proc/self/maps.
fn main_stack_top() -> u64 {
    std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.ends_with("[stack]")).and_then(|l| {
                let range = l.split_whitespace().next()?;
                u64::from_str_radix(range.split_once('-')?.1, 16).ok()
            })
        })
        .unwrap_or(0)
}
/// Frames the last unwind found (to print a depth).
static PART_DEPTH: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The floor's handler plus the parts of the sampler's handler selected in
/// [`FLOOR_PARTS`]: the cost of each part, measured in the signal context
/// it runs in.
extern "C" fn parts_handler(_: libc::c_int, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    use std::sync::atomic::Ordering::Relaxed;
    FLOOR_SIGNALS.fetch_add(1, Relaxed);
    let parts = FLOOR_PARTS.load(Relaxed);
    let t0 = mono_ns();
    let mut frames = [0u64; 128];
    if parts & PART_SYSCALLS != 0 {
        let mut name = [0u8; 16];
        // SAFETY: gettid has no preconditions; PR_GET_NAME writes at most
        // 16 bytes into `name`.
        unsafe {
            std::hint::black_box(libc::gettid());
            libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr());
        }
        std::hint::black_box(name);
    }
    if parts & PART_UNWIND != 0 {
        let mut depth = 0usize;
        // SAFETY: as in the sampler: libgcc's unwinder without
        // backtrace-rs's lock; the closure only stores integers. No unwind
        // info is registered in this bench (no trampolines), so no libgcc
        // lock or lazy sort is involved.
        unsafe {
            backtrace::trace_unsynchronized(|f| {
                if depth >= frames.len() {
                    return false;
                }
                frames[depth] = f.ip() as u64;
                depth += 1;
                true
            });
        }
        PART_DEPTH.store(depth as u32, Relaxed);
    }
    if parts & PART_FP != 0 && !uc.is_null() {
        // SAFETY: `uc` is the kernel's ucontext_t for this signal.
        let g = unsafe { &(*uc.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        frames[0] = g[libc::REG_RIP as usize] as u64;
        let mut bp = g[libc::REG_RBP as usize] as u64;
        let sp = g[libc::REG_RSP as usize] as u64;
        let mut depth = 1;
        // Walks up while rbp points into the stack above sp, 8-aligned and
        // strictly increasing: this bench's own threads, built with frame
        // pointers, whose stack is mapped up to the top.
        let top = STACK_TOP.load(Relaxed);
        while depth < frames.len() && bp >= sp && bp % 8 == 0 && bp + 16 <= top {
            // SAFETY: [bp, bp + 16) lies between the interrupted sp and the
            // top of the main thread's stack (`[stack]` in /proc/self/maps,
            // read before the signals were enabled; the workload runs on
            // the main thread), which is mapped: [bp] and [bp+8] are the
            // saved rbp and the return address in frames built with frame
            // pointers (.cargo/config.toml), plain stack words otherwise.
            let (next, ret) = unsafe { (*(bp as *const u64), *((bp + 8) as *const u64)) };
            if ret == 0 {
                break;
            }
            frames[depth] = ret;
            depth += 1;
            if next <= bp {
                break;
            }
            bp = next;
        }
        PART_DEPTH.store(depth as u32, Relaxed);
    }
    std::hint::black_box(&frames);
    let i = PART_N.fetch_add(1, Relaxed);
    if let Some(slot) = PART_NS.get(i as usize) {
        slot.store(mono_ns().saturating_sub(t0), Relaxed);
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (the vDSO: no system call, usable in
/// a signal handler).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; clock_gettime is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The handler body's own time per signal (wall time inside the
/// handler, user space only: what the parts cost, without the kernel's
/// delivery), for the first signals of a run.
static PART_NS: [std::sync::atomic::AtomicU64; 4096] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 4096];
static PART_N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The median of the first `PART_N` handler times, then resets them.
fn part_median_ns() -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let n = (PART_N.swap(0, Relaxed) as usize).min(PART_NS.len());
    let mut v: Vec<u64> = PART_NS[..n].iter().map(|a| a.load(Relaxed)).collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// `perf_event_attr` as far as the floor needs it (VER0 layout, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct FloorAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
}

/// Runs `work` on this thread with a per-thread cpu-clock perf event at
/// `hz` whose signal (SIGPROF) goes to this thread and runs an empty
/// handler: the cost of the kernel's sampling and signal delivery alone,
/// the same clock the profiler uses. Returns (this thread's CPU time,
/// signals handled).
fn floor(hz: u64) -> (Duration, u64) {
    floor_with(hz, None)
}

/// [`floor`] with [`parts_handler`] doing `parts` when `Some`.
fn floor_with(hz: u64, parts: Option<u32>) -> (Duration, u64) {
    const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
    const PERF_TYPE_SOFTWARE: u32 = 1;
    const DISABLED: u64 = 1;
    const EXCLUDE_KERNEL: u64 = 1 << 5;
    const EXCLUDE_HV: u64 = 1 << 6;
    const F_SETSIG: libc::c_int = 10;
    const F_SETOWN_EX: libc::c_int = 15;
    const F_OWNER_TID: libc::c_int = 0;
    const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    #[repr(C)]
    struct Owner {
        kind: libc::c_int,
        pid: libc::pid_t,
    }
    let attr = FloorAttr {
        kind: PERF_TYPE_SOFTWARE,
        size: std::mem::size_of::<FloorAttr>() as u32,
        config: PERF_COUNT_SW_CPU_CLOCK,
        sample_period: 1_000_000_000 / hz,
        flags: DISABLED | EXCLUDE_KERNEL | EXCLUDE_HV,
        wakeup_events: 1,
        ..Default::default()
    };
    // SAFETY: sigaction is plain data; zeroed is a valid empty value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = floor_handler as extern "C" fn(libc::c_int) as usize;
    sa.sa_flags = libc::SA_RESTART;
    if let Some(p) = parts {
        FLOOR_PARTS.store(p, std::sync::atomic::Ordering::Relaxed);
        sa.sa_sigaction = parts_handler
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        sa.sa_flags = libc::SA_RESTART | libc::SA_SIGINFO;
    }
    // SAFETY: zeroed is valid for the out-value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigaction structs; no profiler session runs now (the
    // rounds are sequential), so SIGPROF is ours until restored below.
    unsafe { libc::sigaction(libc::SIGPROF, &sa, &mut old) };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: perf_event_open reads `attr` (64 bytes, VER0) and returns a
    // new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const FloorAttr,
            tid,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    } as libc::c_int;
    assert!(
        fd >= 0,
        "perf_event_open: {}",
        std::io::Error::last_os_error()
    );
    let owner = Owner {
        kind: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: fcntl/ioctl on our own fd with valid arguments.
    let ok = unsafe {
        libc::fcntl(fd, F_SETOWN_EX, &owner as *const Owner) == 0
            && libc::fcntl(fd, F_SETSIG, libc::SIGPROF) == 0
            && libc::fcntl(fd, libc::F_SETFL, libc::O_ASYNC) == 0
    };
    assert!(ok, "fcntl: {}", std::io::Error::last_os_error());
    let before = FLOOR_SIGNALS.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = thread_cpu();
    // SAFETY: enables our own event.
    unsafe { libc::ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) };
    work(ITERS);
    // SAFETY: closing our own fd stops the event; no signal is sent after.
    unsafe { libc::close(fd) };
    let spent = thread_cpu() - t0;
    let n = FLOOR_SIGNALS.load(std::sync::atomic::Ordering::Relaxed) - before;
    // SAFETY: restores the disposition saved above.
    unsafe { libc::sigaction(libc::SIGPROF, &old, std::ptr::null_mut()) };
    (spent, n)
}

/// Baseline, floor and hotpatch sampling-only rows, interleaved, 7 rounds,
/// with the samples each session took.
fn sampling_only() {
    let rounds = 7;
    let mut base = Vec::new();
    let mut ours = [Vec::new(), Vec::new()];
    let mut samples = [Vec::new(), Vec::new()];
    let mut in_thread = [Vec::new(), Vec::new()];
    let mut floors = [Vec::new(), Vec::new()];
    let mut floor_signals = [Vec::new(), Vec::new()];
    let mut base_thread = Vec::new();
    let mut ring = [Vec::new(), Vec::new()];
    let mut ring_thread = [Vec::new(), Vec::new()];
    let mut ring_samples = [Vec::new(), Vec::new()];
    // The perf peers: this binary's `workload` mode as perf's child, in
    // the same rounds (skipped, with the reason, where perf cannot run).
    let dir = std::env::temp_dir().join(format!("hotpatch-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut perf = match perf_usable(&dir) {
        Ok(()) => Some([peers(99, &dir), peers(1000, &dir)]),
        Err(why) => {
            println!("perf peer rows skipped: {why}");
            None
        }
    };
    for _ in 0..rounds {
        if let Some(perf) = perf.as_mut() {
            for p in perf.iter_mut().flatten() {
                run_peer(p);
            }
        }
        let t0 = thread_cpu();
        base.push(time(|| {
            work(ITERS);
        }));
        base_thread.push(thread_cpu() - t0);
        for (i, hz) in [99, 1000].into_iter().enumerate() {
            let (spent, n) = floor(hz as u64);
            floors[i].push(spent);
            floor_signals[i].push(n);
            // The signal clock (the default is the ring since issue #12).
            // The helper unwinds the handlers' stack copies: what it has
            // not drained yet is unwound by the checkpoint (as for the
            // ring).
            let (th, p, n) = clock_session(Clock::PerfEvent, hz, ITERS, true);
            ours[i].push(p);
            in_thread[i].push(th);
            samples[i].push(n);

            let (th, p, n) = clock_session(Clock::PerfRing, hz, ITERS, true);
            ring[i].push(p);
            ring_thread[i].push(th);
            ring_samples[i].push(n);
        }
    }
    let b = median(base);
    println!("baseline (no profiler): {b:?}");
    for (i, hz) in [99, 1000].into_iter().enumerate() {
        let o = median(ours[i].clone());
        let mut n = samples[i].clone();
        n.sort_unstable();
        let n = n[n.len() / 2];
        let extra = o.as_secs_f64() - b.as_secs_f64();
        // The workload thread's own CPU (its signal handlers included) vs
        // the rest of the process (the helper thread).
        let th = median(in_thread[i].clone());
        let bt = median(base_thread.clone());
        let helper = median(
            ours[i]
                .iter()
                .zip(&in_thread[i])
                .map(|(p, t)| p.saturating_sub(*t))
                .collect(),
        );
        let fl = median(floors[i].clone());
        let mut fs = floor_signals[i].clone();
        fs.sort_unstable();
        println!(
            "{hz:>5} Hz: floor (same clock, empty handler) {fl:?} ({:+.2}%), median {} signals",
            (fl.as_secs_f64() / bt.as_secs_f64() - 1.0) * 100.0,
            fs[fs.len() / 2]
        );
        println!(
            "{hz:>5} Hz: workload thread {th:?} ({:+.2}% vs its {bt:?} without; {:+.2}% vs the floor), other threads {helper:?}",
            (th.as_secs_f64() / bt.as_secs_f64() - 1.0) * 100.0,
            (th.as_secs_f64() / fl.as_secs_f64() - 1.0) * 100.0
        );
        println!(
            "{hz:>5} Hz sampling only: {o:?} ({:+.2}%), median {n} samples, {:.1} us extra CPU per sample",
            (o.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0,
            extra * 1e6 / n.max(1) as f64
        );
        let rp = median(ring[i].clone());
        let rt = median(ring_thread[i].clone());
        let mut rn = ring_samples[i].clone();
        rn.sort_unstable();
        println!(
            "{hz:>5} Hz perf-ring: workload thread {rt:?} ({:+.2}% vs without), process {rp:?} ({:+.2}% vs without), median {} samples",
            (rt.as_secs_f64() / bt.as_secs_f64() - 1.0) * 100.0,
            (rp.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0,
            rn[rn.len() / 2]
        );
    }
    if let Some(perf) = &perf {
        for (hz, p) in [99, 1000].into_iter().zip(perf) {
            print_peers(hz, p);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    ring_stack_sizes(b);
}

/// A call chain `levels` deep, each frame holding 512 bytes (~600 with
/// the rest of the frame), with the work at its bottom.
#[inline(never)]
fn nested(levels: u32, iters: u64) -> u64 {
    let pad = std::hint::black_box([levels as u8; 512]);
    if levels == 0 {
        return work(iters);
    }
    nested(levels - 1, iters).wrapping_add(u64::from(pad[7]))
}

#[inline(never)]
fn nested_root(iters: u64) -> u64 {
    nested(20, iters)
}

/// perf-ring at 1 kHz with 8, 16 and 32 KiB of stack copied per sample:
/// process CPU against the baseline `b`, and the share of samples in
/// `work` whose stack reaches `ring_stack_sizes` (above 21 `nested`
/// frames, ~12.5 KiB; `nested_root` itself tail-calls, it has no frame).
fn ring_stack_sizes(b: Duration) {
    let sizes = [8 * 1024, 16 * 1024, 32 * 1024];
    let mut cost = [Vec::new(), Vec::new(), Vec::new()];
    let mut reach = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..5 {
        for (i, &bytes) in sizes.iter().enumerate() {
            let s = ProfilerBuilder::new()
                .frequency(1000)
                .clock(Some(Clock::PerfRing))
                .ring_stack(bytes)
                .start()
                .expect("start perf-ring");
            cost[i].push(time(|| {
                nested_root(ITERS);
                s.checkpoint();
            }));
            let r = s.stop().expect("stop");
            let has = |st: &[usize], f: &str| {
                st.iter().any(|&l| {
                    r.locations[l]
                        .function_names()
                        .iter()
                        .any(|n| n.ends_with(f))
                })
            };
            let (mut all, mut deep) = (0u64, 0u64);
            for smp in &r.samples {
                if has(&smp.stack, "overhead::work") {
                    all += smp.count;
                    if smp.stack.iter().any(|&l| {
                        r.locations[l]
                            .function_names()
                            .iter()
                            .any(|n| n.contains("ring_stack_sizes"))
                    }) {
                        deep += smp.count;
                    }
                }
            }
            if std::env::var_os("RING_DEBUG").is_some() {
                let deepest = r.samples.iter().max_by_key(|s| s.count);
                println!(
                    "{} KiB: {all} in work, {deep} reach ring_stack_sizes, commonest stack {} frames deep",
                    bytes / 1024,
                    deepest.map_or(0, |s| s.stack.len())
                );
            }
            reach[i].push(Duration::from_nanos(deep * 1_000_000 / all.max(1)));
        }
    }
    for (i, bytes) in sizes.iter().enumerate() {
        let c = median(cost[i].clone());
        let r = median(reach[i].clone()).as_nanos() as f64 / 10_000.0;
        println!(
            " 1000 Hz perf-ring, {} KiB of stack: process {c:?} ({:+.2}% vs the baseline), {r:.1}% of samples in work reach ring_stack_sizes",
            bytes / 1024,
            (c.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0,
        );
    }
}

/// CPU time of every waited-for descendant so far (`RUSAGE_CHILDREN`:
/// `perf record` and, through it, the workload it ran).
fn children_cpu() -> Duration {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The `perf record` peer rows: a configuration's arguments after
/// `perf record` (empty: the workload run bare, the peers' baseline).
struct Peer {
    label: &'static str,
    args: Vec<String>,
    /// The workload thread's CPU, as the child measured it.
    thread: Vec<Duration>,
    /// perf's and the child's CPU together (`RUSAGE_CHILDREN`).
    total: Vec<Duration>,
    /// Samples perf wrote, from its "(N samples)" line.
    samples: Vec<u64>,
}

/// The peer configurations at `hz`: the bare child, `perf record` with no
/// call graph (the cost of the sample itself), with frame-pointer call graphs (`-g`) and with DWARF call graphs copying
/// 8 KiB of stack per sample (the peer of `Clock::PerfRing`), and at 1 kHz
/// also 16 KiB (the ring's default copy).
fn peers(hz: u32, dir: &std::path::Path) -> Vec<Peer> {
    let out = dir.join(format!("perf-{hz}.data"));
    let base = |cg: &[&str]| {
        let mut a: Vec<String> = [
            "record",
            "-e",
            "cpu-clock:u",
            "-F",
            &hz.to_string(),
            "--no-buildid",
            "-o",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(out.display().to_string());
        a.extend(cg.iter().map(|s| s.to_string()));
        a
    };
    let mut v = vec![
        ("bare child (no profiler)", Vec::new()),
        // perf's fixed cost (start-up, reading the child's maps, exit):
        // one sample per second, ~none in a 0.75 s workload.
        ("perf record -F 1 (perf's fixed cost)", {
            let mut a = base(&["-g"]);
            let f = a.iter().position(|x| x == "-F").expect("-F") + 1;
            a[f] = "1".to_string();
            a
        }),
        // The sample alone (the timer interrupt and a user-space IP, no
        // call chain, no stack): what any sampler at this rate pays on
        // this machine before it records a single frame.
        ("perf record, no call graph (the sample alone)", base(&[])),
        ("perf record -g", base(&["-g"])),
        (
            "perf record --call-graph dwarf,8192",
            base(&["--call-graph", "dwarf,8192"]),
        ),
    ];
    if hz >= 1000 {
        v.push((
            "perf record --call-graph dwarf,16384",
            base(&["--call-graph", "dwarf,16384"]),
        ));
    }
    v.into_iter()
        .map(|(label, args)| Peer {
            label,
            args,
            thread: Vec::new(),
            total: Vec::new(),
            samples: Vec::new(),
        })
        .collect()
}

/// Whether `perf record -e cpu-clock:u` works here (the reason if not).
fn perf_usable(dir: &std::path::Path) -> Result<(), String> {
    let out = std::process::Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock:u", "-F", "99", "-o"])
        .arg(dir.join("probe.data"))
        .args(["--", "true"])
        .output()
        .map_err(|e| format!("cannot run perf: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "perf record failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs this bench binary's `workload` mode once, under `perf <args>`
/// (bare when `args` is empty), and records the peer's figures.
fn run_peer(p: &mut Peer) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = if p.args.is_empty() {
        std::process::Command::new(&exe)
    } else {
        let mut c = std::process::Command::new("perf");
        c.args(&p.args).arg("--").arg(&exe);
        c
    };
    cmd.arg("--bench").env("HOTPATCH_BENCH_ONLY", "workload");
    let before = children_cpu();
    let out = cmd.output().expect("spawn the peer");
    let total = children_cpu() - before;
    assert!(
        out.status.success(),
        "{}: {}\n{}",
        p.label,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ns: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("workload_thread_ns "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: no workload time in {stdout:?}", p.label));
    p.thread.push(Duration::from_nanos(ns));
    p.total.push(total);
    // The samples perf wrote (`--no-buildid` leaves them uncounted in its
    // own summary): `perf report --stats`' "SAMPLE events: N", read after
    // the timed span.
    if let Some(data) = p
        .args
        .iter()
        .position(|a| a == "-o")
        .map(|i| &p.args[i + 1])
    {
        let stats = std::process::Command::new("perf")
            .args(["report", "--stats", "-i"])
            .arg(data)
            .output();
        if let Some(n) = stats.ok().and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                l.trim()
                    .strip_prefix("SAMPLE events:")
                    .and_then(|r| r.split_whitespace().next()?.parse().ok())
            })
        }) {
            p.samples.push(n);
        }
    }
}

/// Prints the peer rows of `hz` against their bare-child baseline.
fn print_peers(hz: u32, peers: &[Peer]) {
    let Some((bare, rest)) = peers.split_first() else {
        return;
    };
    let bt = median(bare.thread.clone());
    let bp = median(bare.total.clone());
    println!(
        "{hz:>5} Hz peer: {}: workload thread {bt:?}, child process {bp:?}",
        bare.label
    );
    let fixed = rest.first().map_or(bp, |f| median(f.total.clone()));
    for p in rest {
        let t = median(p.thread.clone());
        let c = median(p.total.clone());
        let mut n = p.samples.clone();
        n.sort_unstable();
        let n = n.get(n.len() / 2).copied().unwrap_or(0);
        println!(
            "{hz:>5} Hz peer: {}: workload thread {t:?} ({:+.2}% vs bare), perf + child {c:?} ({:+.2}% vs bare child, {:+.1} ms; {:+.2}% of the bare child beyond perf's fixed cost), median {n} samples",
            p.label,
            (t.as_secs_f64() / bt.as_secs_f64() - 1.0) * 100.0,
            (c.as_secs_f64() / bp.as_secs_f64() - 1.0) * 100.0,
            (c.as_secs_f64() - bp.as_secs_f64()) * 1e3,
            (c.as_secs_f64() - fixed.as_secs_f64()) / bp.as_secs_f64() * 100.0,
        );
    }
}

/// `HOTPATCH_BENCH_ONLY=handler-parts`: at 1 kHz, the floor (empty
/// handler) against the floor's handler doing each part of the sampler's
/// handler, and the sampler itself (workload thread), interleaved, 5
/// rounds: what each part costs per signal in the signal context.
fn handler_parts() {
    let variants: [(&str, Option<u32>); 6] = [
        ("empty handler (floor)", None),
        ("SA_SIGINFO, count only", Some(0)),
        ("gettid + prctl(PR_GET_NAME)", Some(PART_SYSCALLS)),
        ("libgcc _Unwind_Backtrace", Some(PART_UNWIND)),
        ("frame-pointer walk", Some(PART_FP)),
        ("gettid + prctl + libgcc", Some(PART_SYSCALLS | PART_UNWIND)),
    ];
    STACK_TOP.store(main_stack_top(), std::sync::atomic::Ordering::Relaxed);
    let rounds = 5;
    let mut base = Vec::new();
    let mut cost: Vec<Vec<(Duration, u64)>> = vec![Vec::new(); variants.len()];
    let mut depth = vec![0u32; variants.len()];
    let mut inside: Vec<Vec<u64>> = vec![Vec::new(); variants.len()];
    let mut ours = Vec::new();
    let mut ours_n = Vec::new();
    for _ in 0..rounds {
        let t0 = thread_cpu();
        work(ITERS);
        base.push(thread_cpu() - t0);
        for (i, (_, parts)) in variants.iter().enumerate() {
            cost[i].push(floor_with(1000, *parts));
            depth[i] = PART_DEPTH.swap(0, std::sync::atomic::Ordering::Relaxed);
            inside[i].push(part_median_ns());
        }
        let s = ProfilerBuilder::new()
            .frequency(1000)
            .start()
            .expect("start");
        let t0 = thread_cpu();
        work(ITERS);
        ours.push(thread_cpu() - t0);
        ours_n.push(s.stop().expect("stop").stats.samples);
    }
    let b = median(base);
    println!("workload thread, no signals: {b:?}");
    let per = |d: Duration, n: u64| (d.as_secs_f64() - b.as_secs_f64()) * 1e6 / n.max(1) as f64;
    for (i, (label, _)) in variants.iter().enumerate() {
        let d = median(cost[i].iter().map(|c| c.0).collect());
        let mut n: Vec<u64> = cost[i].iter().map(|c| c.1).collect();
        n.sort_unstable();
        let n = n[n.len() / 2];
        println!(
            " 1000 Hz {label}: {d:?} ({:+.2}%), {n} signals, {:.1} us per signal, handler body {:.2} us (median), last depth {}",
            (d.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0,
            per(d, n),
            {
                let mut v = inside[i].clone();
                v.sort_unstable();
                v[v.len() / 2] as f64 / 1e3
            },
            depth[i]
        );
    }
    let d = median(ours);
    ours_n.sort_unstable();
    let n = ours_n[ours_n.len() / 2];
    println!(
        " 1000 Hz hotpatch sampler: {d:?} ({:+.2}%), {n} samples, {:.1} us per sample",
        (d.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0,
        per(d, n)
    );
}

/// `HOTPATCH_BENCH_ROUNDS` (default `default`) and `HOTPATCH_BENCH_ITERS`
/// (the workload's iterations, default [`ITERS`], ~0.75 s).
fn knobs(default: usize) -> (usize, u64) {
    let rounds = std::env::var("HOTPATCH_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1);
    let iters = std::env::var("HOTPATCH_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ITERS);
    (rounds, iters)
}

/// Median and interquartile range of `v` (percent values).
fn median_iqr(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
    (q(0.5), q(0.75) - q(0.25))
}

/// One session of `clock` over `work(iters)` at `hz`: the workload
/// thread's CPU, the process's CPU (with the session's last drain when
/// `checkpoint`) and the samples.
fn clock_session(clock: Clock, hz: i32, iters: u64, checkpoint: bool) -> (Duration, Duration, u64) {
    let s = ProfilerBuilder::new()
        .frequency(hz)
        .clock(Some(clock))
        .start()
        .expect("start");
    let t0 = thread_cpu();
    let mut th = Duration::ZERO;
    let p = time(|| {
        work(iters);
        th = thread_cpu() - t0;
        if checkpoint {
            s.checkpoint();
        }
    });
    let r = s.stop().expect("stop");
    (th, p, r.stats.samples)
}

/// `HOTPATCH_BENCH_ONLY=ring`: the default clock (perf-ring) at 99 Hz and
/// 1 kHz against the bare workload, decided on **paired** differences:
/// each round runs baseline A, 99 Hz, baseline B, 1 kHz back to back, and
/// a configuration's overhead in that round is its CPU against the mean of
/// that round's two baselines. Printed: the median over the rounds and the
/// interquartile range, beside the same statistic for baseline A against
/// baseline B (the noise floor: what a configuration costing nothing would
/// show). Rounds and work size: `HOTPATCH_BENCH_ROUNDS` (default 9),
/// `HOTPATCH_BENCH_ITERS`.
fn ring_paired() {
    let (rounds, iters) = knobs(9);
    let mut noise = (Vec::new(), Vec::new());
    let mut rows = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    let mut samples = [Vec::new(), Vec::new()];
    let bare = || {
        let t0 = thread_cpu();
        let p = time(|| {
            work(iters);
        });
        (thread_cpu() - t0, p)
    };
    let ring = |hz: i32| clock_session(Clock::PerfRing, hz, iters, true);
    let pct = |x: Duration, b: f64| (x.as_secs_f64() / b - 1.0) * 100.0;
    for _ in 0..rounds {
        let a = bare();
        let r99 = ring(99);
        let b = bare();
        let r1k = ring(1000);
        let bt = (a.0.as_secs_f64() + b.0.as_secs_f64()) / 2.0;
        let bp = (a.1.as_secs_f64() + b.1.as_secs_f64()) / 2.0;
        noise.0.push(pct(a.0, b.0.as_secs_f64()));
        noise.1.push(pct(a.1, b.1.as_secs_f64()));
        for (i, r) in [r99, r1k].into_iter().enumerate() {
            rows[i].0.push(pct(r.0, bt));
            rows[i].1.push(pct(r.1, bp));
            samples[i].push(r.2);
        }
    }
    println!(
        "perf-ring, paired rounds: {rounds} rounds, work({iters}), load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let (nt, nti) = median_iqr(noise.0);
    let (np, npi) = median_iqr(noise.1);
    println!(
        "  noise (baseline A vs B): thread {nt:+.2}% (IQR {nti:.2}), process {np:+.2}% (IQR {npi:.2})"
    );
    for (i, hz) in [99, 1000].into_iter().enumerate() {
        let (t, ti) = median_iqr(rows[i].0.clone());
        let (p, pi) = median_iqr(rows[i].1.clone());
        let mut n = samples[i].clone();
        n.sort_unstable();
        println!(
            "  {hz:>4} Hz: workload thread {t:+.2}% (IQR {ti:.2}), process {p:+.2}% (IQR {pi:.2}), median {} samples",
            n[n.len() / 2]
        );
    }
}

/// `HOTPATCH_BENCH_ONLY=helper-phases`: where the helper thread's CPU goes
/// with perf-ring at 99 Hz and 1 kHz (`hotpatch_profiler::phases`: thread
/// CPU time of each phase), per session, per wake and per sample; first
/// the helper's total with the counters off (their own cost left out).
/// `HOTPATCH_BENCH_ROUNDS` (default 3), `HOTPATCH_BENCH_ITERS`.
fn helper_phases() {
    use hotpatch_profiler::phases;
    let (rounds, iters) = knobs(3);
    // First with the counters off: timing each phase costs the helper two
    // `clock_gettime(CLOCK_THREAD_CPUTIME_ID)` system calls per phase (three
    // phases per sample), so the counted runs below overstate the helper.
    // With a checkpoint inside the timed span, so the session's last drain
    // (otherwise done by `stop()`, untimed) counts too: fewer, fuller
    // drains cannot hide work there.
    phases::enable(false);
    for hz in [99, 1000] {
        let mut v = Vec::new();
        let mut samples = 0;
        for _ in 0..rounds {
            let (th, p, n) = clock_session(Clock::PerfRing, hz, iters, true);
            samples += n;
            v.push(p.saturating_sub(th));
        }
        let total: Duration = v.iter().sum();
        println!(
            "{hz:>4} Hz perf-ring, counters off, last drain included: {samples} samples, other threads' CPU {:.2} ms per session (median {:.2} ms)",
            total.as_secs_f64() * 1e3 / rounds as f64,
            median(v).as_secs_f64() * 1e3
        );
    }
    phases::enable(true);
    for hz in [99, 1000] {
        phases::reset();
        let mut samples = 0;
        let mut helper = Duration::ZERO;
        for _ in 0..rounds {
            let (th, p, n) = clock_session(Clock::PerfRing, hz, iters, false);
            samples += n;
            helper += p.saturating_sub(th);
        }
        let snap = phases::snapshot();
        let wakes = snap[0].2.max(1);
        println!(
            "{hz:>4} Hz perf-ring, {rounds} sessions of work({iters}): {samples} samples, {wakes} helper wakes, other threads' CPU {:.2} ms per session",
            helper.as_secs_f64() * 1e3 / rounds as f64
        );
        for (phase, ns, n) in snap {
            println!(
                "  {:<11} {:>8.3} ms per session, {:>7.2} us per wake, {:>7.2} us per sample, ran {n} times",
                format!("{phase:?}"),
                ns as f64 / 1e6 / rounds as f64,
                ns as f64 / 1e3 / wakes as f64,
                ns as f64 / 1e3 / samples.max(1) as f64,
            );
        }
    }
    phases::enable(false);
}
