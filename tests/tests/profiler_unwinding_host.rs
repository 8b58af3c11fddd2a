//! A profiled process whose own threads unwind (a panic caught by
//! `catch_unwind`, `std::backtrace::Backtrace::force_capture`) must not
//! hang, whatever the clock (issue #12, item 1).
//!
//! libgcc 12's `_Unwind_Find_FDE` takes its `object_mutex` whenever any
//! object was registered with `__register_frame` — in a profiled process
//! always: the profiler registers CFI for anonymous ranges (here one the
//! test registers). A sampler that unwinds with libgcc *inside* its signal
//! handler, hit while the interrupted thread holds that mutex, locks it
//! again on the same thread: the process hangs forever
//! (docs/DESIGN-NOTES.md, "libgcc's object_mutex and the sampler").
//!
//! The workload runs in a child process per clock, under a CPU hog of two
//! busy processes per core (preemption inside the mutex makes the race
//! likely). The verdict is the child's: it finished, the workers did their
//! fixed amount of CPU work, samples were taken and name the workers. The
//! parent's 120 s bound is only a hang guard: past it, the child's threads'
//! backtraces are printed (`gdb`) and the test fails instead of hanging.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hotpatch_profiler::{Clock, ProfilerBuilder};
use hotpatch_symbolizer::{Registry, RuntimeAddr};
use hotpatch_tests::exec::ExecMem;
use hotpatch_tests::load::{Hog, thread_cpu};

const CHILD: &str = "HOTPATCH_TEST_UNWINDING_CHILD";
/// CPU time each worker spends unwinding while sampled (~1,000 samples per
/// worker at 999 Hz). CPU time, never wall time: a starved child just takes
/// longer.
const WORKER_CPU: Duration = Duration::from_millis(1000);
const WORKERS: usize = 3;
/// The hang guard: a child that has not exited by then is stuck.
const HANG_GUARD: Duration = Duration::from_secs(120);

unsafe extern "C" {
    /// libgcc: start of the function (FDE) containing `pc`, or null.
    fn _Unwind_FindEnclosingFunction(pc: *mut libc::c_void) -> *mut libc::c_void;
}

/// One unwinding round: a panic caught by `catch_unwind` (libgcc's
/// `_Unwind_RaiseException`, two phases of `_Unwind_Find_FDE`), then a
/// captured backtrace (`_Unwind_Backtrace`).
#[inline(never)]
fn unwind_round(i: u64) -> u64 {
    let r = std::panic::catch_unwind(|| {
        if std::hint::black_box(i) != u64::MAX {
            std::panic::panic_any(i);
        }
        i
    });
    let caught = r.is_err() as u64;
    let bt = std::backtrace::Backtrace::force_capture();
    // Only whether it captured frames (not resolving them: that is slow
    // and takes std's own locks, not libgcc's).
    let captured = matches!(bt.status(), std::backtrace::BacktraceStatus::Captured) as u64;
    std::hint::black_box(caught + captured)
}

#[inline(never)]
fn unwinding_worker(rounds: &AtomicU64) {
    let end = thread_cpu() + WORKER_CPU;
    let mut i = 0u64;
    while thread_cpu() < end {
        i = i.wrapping_add(unwind_round(i));
        rounds.fetch_add(1, Ordering::Relaxed);
    }
}

/// Run by `an_application_that_unwinds_while_sampled_does_not_hang` in a
/// child process, for the clock named in [`CHILD`].
#[test]
#[ignore = "run in a child process by an_application_that_unwinds_while_sampled_does_not_hang"]
fn unwinding_child() {
    let name = std::env::var(CHILD).expect("run by the parent test only");
    let clock = Clock::from_name(&name).unwrap();
    // Quiet panics: the hook would print ~10^4 messages.
    std::panic::set_hook(Box::new(|_| {}));
    // An anonymous range with CFI the profiler registers with libgcc:
    // from now on every libgcc FDE lookup takes `object_mutex`.
    let mut mem = ExecMem::new(1);
    let at = mem.put_bytes(0, &[0xc3; 16]) as u64;
    mem.seal();
    let reg = Registry::global();
    reg.refresh().unwrap();
    let _range = reg
        .register_anon("test::ret16", RuntimeAddr(at), 16)
        .unwrap();
    let session = ProfilerBuilder::new()
        .frequency(999)
        .clock(Some(clock))
        .start()
        .unwrap();
    assert_eq!(session.clock(), clock);
    {
        let _quiet = hotpatch_sys::signal::MaskGuard::block_all().unwrap();
        // SAFETY: a query of libgcc's tables; `at + 1` is only compared.
        let fde = unsafe { _Unwind_FindEnclosingFunction((at + 1) as *mut libc::c_void) };
        assert_eq!(
            fde as u64, at,
            "the range's CFI is registered with libgcc (object_mutex in use)"
        );
    }
    let rounds = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let rounds = Arc::clone(&rounds);
            std::thread::Builder::new()
                .name(format!("unwinder{i}"))
                .spawn(move || unwinding_worker(&rounds))
                .unwrap()
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let report = session.stop().unwrap();
    let s = &report.stats;
    let rounds = rounds.load(Ordering::Relaxed);
    println!(
        "{clock}: {rounds} unwinding rounds; {} samples, {} signals, {} lost",
        s.samples, s.signals, s.lost_buffer_full
    );
    assert!(rounds > 0);
    // 3 x 1 s of CPU at 999 Hz is ~3,000 periods; a tick-checked clock on
    // a loaded machine delivers fewer signals (but each stands for its
    // overruns), so the floor is far below.
    assert!(s.samples >= 100, "{s:?}");
    let in_worker = report
        .samples
        .iter()
        .filter(|x| x.thread.starts_with("unwinder"))
        .map(|x| x.count)
        .sum::<u64>();
    assert!(
        in_worker >= 50,
        "the workers were sampled: {in_worker}; {s:?}"
    );
    let named = report.locations.iter().any(|l| {
        l.frames.iter().any(|f| {
            f.function
                .as_deref()
                .is_some_and(|n| n.contains("unwinding_worker"))
        })
    });
    assert!(
        named,
        "samples reach the worker function through the unwinding frames"
    );
    println!("CHILD-OK");
}

/// `gdb`'s backtrace of every thread of `pid` (or why there is none).
fn thread_backtraces(pid: u32) -> String {
    match Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => format!(
            "{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("(gdb could not run: {e})"),
    }
}

fn run_child(clock: Clock) -> Result<String, String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "unwinding_child", "--nocapture"])
        .env(CHILD, clock.name())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained by threads: a full pipe must not stall the child.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > HANG_GUARD {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let Some(status) = status else {
        let bt = thread_backtraces(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let stdout = out_t.join().unwrap_or_default();
        return Err(format!(
            "{clock}: the child did not exit within {HANG_GUARD:?} (hung); its threads:\n{bt}\nstdout:\n{stdout}"
        ));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if status.success() && stdout.contains("CHILD-OK") {
        Ok(stdout)
    } else {
        Err(format!(
            "{clock}: the child failed ({status}):\n{stdout}\n{stderr}"
        ))
    }
}

#[test]
fn an_application_that_unwinds_while_sampled_does_not_hang() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let _hog = Hog::per_core(2);
    let mut failures = Vec::new();
    for clock in [
        Clock::PerfEvent,
        Clock::ThreadTimer,
        Clock::ItimerProf,
        Clock::PerfRing,
    ] {
        match run_child(clock) {
            Ok(out) => println!("{out}"),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
