//! The patch-safety harness: prove a patch safe under load, or say exactly
//! why not.
//!
//! [`Harness::run`] runs the preflight, then `threads` threads call the
//! target with generated inputs while a driver cycles install → swap… →
//! disable → enable → remove. It checks that every result equals the old or
//! a new function's result for that input, that the original bytes and page
//! protections are restored exactly after every remove, and that no
//! writable+executable mapping is visible when an API call returns. Fault
//! signals (SIGSEGV, SIGILL, SIGBUS, SIGTRAP) raised by a broken patch kill
//! the process (they cannot be survived in-process); a handler writes which
//! signal and where to stderr first, so the failure says what happened.
//!
//! ```no_run
//! use hotpatch_patcher::verify::Harness;
//!
//! #[inline(never)]
//! extern "C" fn price(x: u64) -> u64 { x * 3 }
//! extern "C" fn price_v2(x: u64) -> u64 { x * 3 + 1 }
//!
//! let f: extern "C" fn(u64) -> u64 = price;
//! let report = Harness::new(f, price_v2 as extern "C" fn(u64) -> u64, |i| i, |f, &x| f(x))
//!     .threads(4)
//!     .cycles(100)
//!     .run();
//! println!("{report}");
//! assert!(report.is_safe());
//! ```

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::Refusal;
use crate::hook::{Function, Hook};
use crate::maps;
use crate::preflight::{PreflightReport, preflight};
use crate::site::InstallOptions;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every check held for every call and cycle.
    Safe,
    /// The preflight (or an install) refused the patch; nothing was changed.
    Refused(Refusal),
    /// A check failed: the first failure, described.
    Unsafe(String),
}

/// What [`Harness::run`] observed.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The preflight report of the target.
    pub preflight: Option<PreflightReport>,
    /// Install/remove cycles completed.
    pub cycles: u64,
    /// Swaps done.
    pub swaps: u64,
    /// Calls made through the target by the worker threads.
    pub calls: u64,
    /// Calls whose result matched neither the old nor a new function.
    pub wrong_results: u64,
    /// Cycles after which the bytes differed from the original.
    pub bytes_mismatches: u64,
    /// Cycles after which page protections differed from the original.
    pub protection_mismatches: u64,
    /// W+X mappings seen at an API return (first few).
    pub wx_seen: Vec<String>,
    /// Threads moved out of/into the prologue during the run.
    pub fixups: u64,
    /// Installs or removes refused because a thread could not be stopped.
    pub unstoppable_refusals: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Verdict.
    pub outcome: Outcome,
}

impl VerifyReport {
    /// True when the outcome is [`Outcome::Safe`].
    pub fn is_safe(&self) -> bool {
        self.outcome == Outcome::Safe
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match &self.outcome {
            Outcome::Safe => "SAFE".to_string(),
            Outcome::Refused(r) => format!("REFUSED {r}"),
            Outcome::Unsafe(why) => format!("UNSAFE {why}"),
        };
        writeln!(f, "patch-safety report: {verdict}")?;
        writeln!(
            f,
            "  cycles {}  swaps {}  calls {}  wrong {}  fixups {}  unstoppable-refusals {}  in {:.2?}",
            self.cycles,
            self.swaps,
            self.calls,
            self.wrong_results,
            self.fixups,
            self.unstoppable_refusals,
            self.elapsed
        )?;
        writeln!(
            f,
            "  bytes restored: {}  protections restored: {}  W+X seen: {}",
            if self.bytes_mismatches == 0 {
                "always"
            } else {
                "NO"
            },
            if self.protection_mismatches == 0 {
                "always"
            } else {
                "NO"
            },
            if self.wx_seen.is_empty() {
                "never".to_string()
            } else {
                format!("{:?}", self.wx_seen)
            }
        )
    }
}

type Gen<I> = Box<dyn Fn(u64) -> I + Send + Sync>;
type Call<F, I, O> = Box<dyn Fn(F, &I) -> O + Send + Sync>;

/// A configured verification run. See the module docs.
pub struct Harness<F: Function, I, O> {
    target: F,
    replacements: Vec<F>,
    input: Gen<I>,
    call: Call<F, I, O>,
    threads: usize,
    cycles: u64,
    swaps_per_cycle: u64,
    inputs: usize,
    known_size: Option<usize>,
    max_time: Duration,
    yield_every: u64,
}

impl<F: Function, I, O> fmt::Debug for Harness<F, I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("target", &format_args!("{:#x}", self.target.addr()))
            .field("replacements", &self.replacements.len())
            .field("threads", &self.threads)
            .field("cycles", &self.cycles)
            .field("swaps_per_cycle", &self.swaps_per_cycle)
            .finish()
    }
}

impl<F, I, O> Harness<F, I, O>
where
    F: Function + Send + Sync,
    I: Send + Sync + 'static,
    O: PartialEq + fmt::Debug + Send + Sync + 'static,
{
    /// A harness for patching `target` with `replacement`. `input(k)` makes the
    /// k-th input; `call(f, input)` calls a function of type `F`.
    pub fn new(
        target: F,
        replacement: F,
        input: impl Fn(u64) -> I + Send + Sync + 'static,
        call: impl Fn(F, &I) -> O + Send + Sync + 'static,
    ) -> Self {
        Harness {
            target,
            replacements: vec![replacement],
            input: Box::new(input),
            call: Box::new(call),
            threads: 4,
            cycles: 100,
            swaps_per_cycle: 10,
            inputs: 256,
            known_size: None,
            max_time: Duration::from_secs(600),
            yield_every: 64,
        }
    }

    /// Another version to swap between (v1 ↔ v2 ↔ v3 …).
    pub fn also_swap_to(mut self, other: F) -> Self {
        self.replacements.push(other);
        self
    }
    /// Worker threads calling the target (default 4).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }
    /// Install/remove cycles (default 100).
    pub fn cycles(mut self, n: u64) -> Self {
        self.cycles = n;
        self
    }
    /// Swaps per cycle (default 10).
    pub fn swaps_per_cycle(mut self, n: u64) -> Self {
        self.swaps_per_cycle = n;
        self
    }
    /// Distinct inputs generated (default 256).
    pub fn inputs(mut self, n: usize) -> Self {
        self.inputs = n.max(1);
        self
    }
    /// The function's size, when known.
    pub fn known_size(mut self, n: usize) -> Self {
        self.known_size = Some(n);
        self
    }
    /// Workers call `sched_yield` every `n` calls (default 64; 0 = never).
    /// A pure spinner on an oversubscribed machine takes a whole scheduler
    /// slice to notice the stop signal; yielding keeps each stop short
    /// without changing what is tested (threads are still caught in the
    /// prologue).
    pub fn yield_every(mut self, n: u64) -> Self {
        self.yield_every = n;
        self
    }
    /// Stop early (still reporting) after this long.
    pub fn max_time(mut self, d: Duration) -> Self {
        self.max_time = d;
        self
    }

    /// Runs the verification. See the module docs for what is checked.
    pub fn run(self) -> VerifyReport {
        install_fault_reporter();
        let start = Instant::now();
        let mut report = VerifyReport {
            preflight: None,
            cycles: 0,
            swaps: 0,
            calls: 0,
            wrong_results: 0,
            bytes_mismatches: 0,
            protection_mismatches: 0,
            wx_seen: Vec::new(),
            fixups: 0,
            unstoppable_refusals: 0,
            elapsed: Duration::ZERO,
            outcome: Outcome::Safe,
        };
        let addr = self.target.addr().as_usize();
        match preflight(addr, self.known_size) {
            Ok(p) => {
                let verdict = p.verdict.clone();
                report.preflight = Some(p);
                if let Err(r) = verdict {
                    report.outcome = Outcome::Refused(r);
                    return report;
                }
            }
            Err(e) => {
                report.outcome = Outcome::Refused(Refusal::from(&e));
                return report;
            }
        }
        let patch_len = report
            .preflight
            .as_ref()
            .map_or(5, |p| p.patch_at - addr + p.patch_len);

        // Expected results, computed before anything is patched.
        let inputs: Vec<I> = (0..self.inputs as u64).map(|k| (self.input)(k)).collect();
        let expect_old: Vec<O> = inputs.iter().map(|i| (self.call)(self.target, i)).collect();
        let expect_new: Vec<Vec<O>> = self
            .replacements
            .iter()
            .map(|&r| inputs.iter().map(|i| (self.call)(r, i)).collect())
            .collect();
        // SAFETY: reading `patch_len` bytes of code at a function entry that
        // preflight just found in a readable executable mapping.
        let bytes_before =
            unsafe { std::slice::from_raw_parts(addr as *const u8, patch_len) }.to_vec();
        let prot_before = page_prots(addr, patch_len);
        // A short function's padding hole (the other written place).
        let hole = report.preflight.as_ref().and_then(|p| p.hole);
        let hole_len = crate::x86_64::decode::HOLE_LEN;
        // SAFETY: the hole is 5 bytes of the same executable mapping, read
        // by the preflight.
        let hole_before =
            hole.map(|h| unsafe { std::slice::from_raw_parts(h as *const u8, hole_len) }.to_vec());
        let fixups_before = crate::counters::stats();

        let quit = AtomicBool::new(false);
        let calls = AtomicU64::new(0);
        let wrong = AtomicU64::new(0);
        let first_wrong: Mutex<Option<String>> = Mutex::new(None);
        let this = &self;
        std::thread::scope(|s| {
            for t in 0..this.threads {
                let (inputs, expect_old, expect_new) = (&inputs, &expect_old, &expect_new);
                let (quit, calls, wrong, first_wrong) = (&quit, &calls, &wrong, &first_wrong);
                s.spawn(move || {
                    let mut k = t;
                    let mut local = 0u64;
                    while !quit.load(Ordering::Relaxed) {
                        k = (k + 1) % inputs.len();
                        let got = (this.call)(this.target, &inputs[k]);
                        local += 1;
                        if this.yield_every != 0 && local % this.yield_every == 0 {
                            std::thread::yield_now();
                        }
                        let ok = got == expect_old[k] || expect_new.iter().any(|e| got == e[k]);
                        if !ok {
                            wrong.fetch_add(1, Ordering::Relaxed);
                            let mut w = first_wrong.lock().unwrap_or_else(|e| e.into_inner());
                            w.get_or_insert_with(|| {
                                format!(
                                    "input #{k}: got {got:?}, expected {:?} (old) or one of {:?}",
                                    expect_old[k],
                                    expect_new.iter().map(|e| &e[k]).collect::<Vec<_>>()
                                )
                            });
                        }
                    }
                    calls.fetch_add(local, Ordering::Relaxed);
                });
            }

            // The driver.
            let opts = InstallOptions {
                known_size: this.known_size,
                name: Some("verify".into()),
                ..Default::default()
            };
            let deadline = start + this.max_time;
            'cycles: for _ in 0..this.cycles {
                if Instant::now() > deadline {
                    break;
                }
                let installed =
                    retry_unstoppable(&mut report.unstoppable_refusals, deadline, || {
                        Hook::install_with(this.target, this.replacements[0], &opts)
                    });
                let mut hook = match installed {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => {
                        report.outcome = Outcome::Unsafe(format!("install failed: {e}"));
                        break;
                    }
                };
                check_wx(&mut report.wx_seen);
                for n in 0..this.swaps_per_cycle {
                    let r = this.replacements[(n as usize + 1) % this.replacements.len()];
                    if let Err(e) = hook.swap(r) {
                        report.outcome = Outcome::Unsafe(format!("swap failed: {e}"));
                        break 'cycles;
                    }
                    report.swaps += 1;
                }
                let toggled = hook.disable().and_then(|()| hook.enable());
                if let Err(e) = toggled {
                    report.outcome = Outcome::Unsafe(format!("disable/enable failed: {e}"));
                    break;
                }
                match retry_unstoppable(&mut report.unstoppable_refusals, deadline, || {
                    hook.remove()
                }) {
                    Ok(Some(())) => {}
                    Ok(None) => {
                        report.outcome = Outcome::Unsafe(
                            "remove refused (E_PATCH_THREAD_UNSTOPPABLE) until the time limit"
                                .into(),
                        );
                        break;
                    }
                    Err(e) => {
                        report.outcome = Outcome::Unsafe(format!("remove failed: {e}"));
                        break;
                    }
                }
                check_wx(&mut report.wx_seen);
                // SAFETY: as for `bytes_before`.
                let now = unsafe { std::slice::from_raw_parts(addr as *const u8, patch_len) };
                // SAFETY: as for `hole_before`.
                let hole_now =
                    hole.map(|h| unsafe { std::slice::from_raw_parts(h as *const u8, hole_len) });
                if now != bytes_before.as_slice() || hole_now != hole_before.as_deref() {
                    report.bytes_mismatches += 1;
                }
                if page_prots(addr, patch_len) != prot_before {
                    report.protection_mismatches += 1;
                }
                report.cycles += 1;
            }
            quit.store(true, Ordering::Relaxed);
        });

        let after = crate::counters::stats();
        report.fixups = (after.fixups_forward - fixups_before.fixups_forward)
            + (after.fixups_backward - fixups_before.fixups_backward);
        report.calls = calls.load(Ordering::Relaxed);
        report.wrong_results = wrong.load(Ordering::Relaxed);
        report.elapsed = start.elapsed();
        if report.outcome == Outcome::Safe {
            let first = first_wrong.into_inner().unwrap_or_else(|e| e.into_inner());
            if let Some(w) = first {
                report.outcome = Outcome::Unsafe(format!(
                    "{} wrong result(s); first: {w}",
                    report.wrong_results
                ));
            } else if report.bytes_mismatches > 0 {
                report.outcome = Outcome::Unsafe("original bytes not restored".into());
            } else if report.protection_mismatches > 0 {
                report.outcome = Outcome::Unsafe("page protections not restored".into());
            } else if !report.wx_seen.is_empty() {
                report.outcome = Outcome::Unsafe("a W+X mapping was visible".into());
            } else if report.cycles == 0 {
                report.outcome = Outcome::Unsafe("no cycle completed".into());
            }
        }
        report
    }
}

/// Runs `op` until it does not answer `E_PATCH_THREAD_UNSTOPPABLE` (a thread that
/// cannot be stopped right now, e.g. starved of CPU past the stop timeout, is
/// a correct refusal, so it is retried, counted in `refusals`); `Ok(None)`
/// once `deadline` passes.
fn retry_unstoppable<T>(
    refusals: &mut u64,
    deadline: Instant,
    mut op: impl FnMut() -> crate::Result<T>,
) -> crate::Result<Option<T>> {
    loop {
        match op() {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.code() == crate::error::E_PATCH_THREAD_UNSTOPPABLE => {
                *refusals += 1;
                if Instant::now() > deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

fn check_wx(seen: &mut Vec<String>) {
    if let Ok(m) = maps::read() {
        for w in maps::writable_executable(&m) {
            if seen.len() < 8 {
                seen.push(format!(
                    "{:#x}-{:#x} {} {}",
                    w.start,
                    w.end,
                    w.perms(),
                    w.name
                ));
            }
        }
    }
}

fn page_prots(addr: usize, len: usize) -> Vec<String> {
    let Ok(all) = maps::read() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut p = addr & !0xfff;
    while p < addr + len {
        out.push(maps::find(&all, p).map_or_else(|| "unmapped".into(), |m| m.perms()));
        p += 0x1000;
    }
    out
}

static FAULT_REPORTER: std::sync::Once = std::sync::Once::new();

/// Installs handlers that print which fault signal hit where, then die by
/// the default action (a fault inside patched code cannot be survived).
/// Chains only to the default action: it is installed for harness runs.
fn install_fault_reporter() {
    FAULT_REPORTER.call_once(|| {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
        let sa = SigAction::new(
            SigHandler::SigAction(fault_reporter),
            SaFlags::SA_SIGINFO | SaFlags::SA_RESETHAND | SaFlags::SA_ONSTACK,
            SigSet::empty(),
        );
        for sig in [Signal::SIGSEGV, Signal::SIGILL, Signal::SIGBUS] {
            // SAFETY: `fault_reporter` is async-signal-safe (write(2) and
            // sigaction/raise only) and a `fn` item, valid forever. A
            // failure leaves the default action, which is what it chains to.
            let _ = unsafe { sigaction(sig, &sa) };
        }
    });
}

extern "C" fn fault_reporter(sig: i32, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: SA_SIGINFO passes the interrupted context.
    let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as u64;
    let mut buf = *b"hotpatch verify: FAULT signal    at rip 0x0000000000000000\n";
    buf[29] = b'0' + (sig / 10) as u8;
    buf[30] = b'0' + (sig % 10) as u8;
    for i in 0..16 {
        let nib = ((rip >> (60 - 4 * i)) & 0xf) as u8;
        buf[42 + i] = if nib < 10 {
            b'0' + nib
        } else {
            b'a' + nib - 10
        };
    }
    // SAFETY: write(2) of a stack buffer to stderr is async-signal-safe.
    unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
    // SA_RESETHAND restored the default action: returning re-executes the
    // faulting instruction, which now kills the process with the signal.
}
