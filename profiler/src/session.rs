//! Builder -> running [`Session`] -> [`Report`]: the sampler's lifecycle and
//! its checkpoints.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use hotpatch_symbolizer::registry::{ModuleKind, SubscriptionId};
use hotpatch_symbolizer::{DebugSearch, Event, Registry, Seq};
use pprof::{ProfilerGuard, ProfilerGuardBuilder, UnresolvedReport};

use crate::error::{Error, Result};
use crate::report::Report;
use crate::unwind;

/// One session at a time: SIGPROF and pprof's collector are process-wide.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Configures and starts a [`Session`].
#[derive(Debug, Clone)]
pub struct ProfilerBuilder {
    frequency: i32,
    inline_frames: bool,
    anon_unwind_info: bool,
    pprof_baseline: bool,
    debug_search: DebugSearch,
}

impl Default for ProfilerBuilder {
    fn default() -> Self {
        ProfilerBuilder {
            frequency: 99,
            inline_frames: true,
            anon_unwind_info: true,
            pprof_baseline: false,
            debug_search: DebugSearch::default(),
        }
    }
}

impl ProfilerBuilder {
    /// Defaults: 99 Hz, inline frames, unwind info for anonymous ranges.
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples per second of CPU time (per process, `ITIMER_PROF`).
    pub fn frequency(mut self, hz: i32) -> Self {
        self.frequency = hz;
        self
    }

    /// Expand inlined calls into their own frames (default on).
    pub fn inline_frames(mut self, on: bool) -> Self {
        self.inline_frames = on;
        self
    }

    /// Register synthesized unwind info for anonymous ranges (trampolines,
    /// relays) so samples in different ranges are not merged and stacks
    /// continue into their callers (default on). See SAFETY.md, "profiler",
    /// for the libgcc lock this implies.
    pub fn anon_unwind_info(mut self, on: bool) -> Self {
        self.anon_unwind_info = on;
        self
    }

    /// Keep pprof-rs's raw stacks so [`Report::pprof_rs_baseline`] can show
    /// what pprof-rs's own resolution makes of the same samples (tests and
    /// benchmarks; costs memory).
    pub fn pprof_baseline(mut self, on: bool) -> Self {
        self.pprof_baseline = on;
        self
    }

    /// Where to look for separate debug files.
    pub fn debug_search(mut self, search: DebugSearch) -> Self {
        self.debug_search = search;
        self
    }

    /// Starts sampling.
    ///
    /// # Errors
    /// [`Error::AlreadyRunning`] while another session runs;
    /// [`Error::BadFrequency`]; [`Error::Sampler`] when pprof fails to start.
    pub fn start(self) -> Result<Session> {
        if !(1..=10_000).contains(&self.frequency) {
            return Err(Error::BadFrequency(self.frequency));
        }
        if RUNNING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Error::AlreadyRunning);
        }
        let reg = Registry::global();
        // Know the main binary and the libraries before the first sample;
        // later arrivals are registered by the loader (or found by a refresh
        // at resolution time).
        let _ = reg.refresh();
        // Unwind info of ranges unregistered while no session listened goes
        // first (also when this session adds none).
        let live: std::collections::HashSet<_> = reg
            .modules()
            .iter()
            .filter(|m| m.unloaded_seq.is_none())
            .map(|m| m.id)
            .collect();
        unwind::retain_only(&live);
        if self.anon_unwind_info {
            for m in reg.modules() {
                if let (ModuleKind::Anon(a), None) = (&m.kind, m.unloaded_seq) {
                    unwind::register(m.id, a.start.0, a.len);
                }
            }
        }
        let guard = match start_guard(self.frequency) {
            Ok(g) => g,
            Err(e) => {
                RUNNING.store(false, Ordering::Release);
                return Err(e);
            }
        };
        crate::capture::release_backtrace_cache();
        RESTORER.store(signal_restorer(), Ordering::Relaxed);
        if self.anon_unwind_info {
            // Unwind info registered from now on goes through the gate
            // (unwind.rs): no sample's unwind may sort a fresh object.
            unwind::install_gate();
        }
        let gate_at_start = unwind::gate_counts();
        let shared = Arc::new(Shared {
            config: self,
            inner: Mutex::new(Inner {
                guard: Some(guard),
                previous: None,
                epochs: Vec::new(),
                errors: Vec::new(),
            }),
            checkpoints: AtomicU64::new(0),
        });
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        let subscription = reg.subscribe(move |ev| {
            if let Some(s) = weak.upgrade() {
                s.on_event(ev);
            }
        });
        Ok(Session {
            shared,
            subscription: Some(subscription),
            gate_at_start,
            started: Instant::now(),
            started_at: SystemTime::now(),
        })
    }
}

/// The address of the signal return trampoline (`__restore_rt`) glibc
/// installed with SIGPROF's handler: the frame after it in a sampled stack is
/// the interrupted instruction (the leaf).
fn signal_restorer() -> u64 {
    // SAFETY: sigaction is plain data; zeroed is a valid value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null `act` only queries; `old` is a valid out-pointer.
    let rc = unsafe { libc::sigaction(libc::SIGPROF, std::ptr::null(), &mut old) };
    if rc == 0 && old.sa_flags & SA_RESTORER != 0 {
        old.sa_restorer.map_or(0, |f| f as usize as u64)
    } else {
        0
    }
}

/// `SA_RESTORER` (x86-64 Linux); not exported by the libc crate.
const SA_RESTORER: libc::c_int = 0x0400_0000;

pub(crate) static RESTORER: AtomicU64 = AtomicU64::new(0);

/// pprof's guard, made sendable.
struct Guard(ProfilerGuard<'static>);

// SAFETY: the guard holds a `&'static` to pprof's global, spin-locked
// profiler and an `ITIMER_PROF` timer (process-wide); neither is tied to the
// thread that created it, and we only touch it under `Shared::inner`.
unsafe impl Send for Guard {}

fn start_guard(hz: i32) -> Result<Guard> {
    Ok(Guard(
        ProfilerGuardBuilder::default().frequency(hz).build()?,
    ))
}

/// Samples taken between two checkpoints, with the registry sequence number
/// at which they are to be resolved.
#[derive(Debug, Default)]
pub(crate) struct Epoch {
    pub(crate) seq: Seq,
    pub(crate) samples: Vec<RawSample>,
    /// pprof-rs's unresolved report, only with `pprof_baseline`.
    pub(crate) baseline: Option<BaselineReport>,
}

/// pprof's unresolved report, made sendable.
pub(crate) struct BaselineReport(pub(crate) UnresolvedReport);

impl std::fmt::Debug for BaselineReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BaselineReport")
    }
}

// SAFETY: frames stored by pprof's collector are clones (`Frame::Cloned`:
// ip, sp and symbol address as plain numbers); nothing points into a
// thread's stack or unwinder context.
unsafe impl Send for BaselineReport {}

/// One captured stack: leaf first. The leaf is the interrupted instruction;
/// the others are return addresses.
#[derive(Debug, Clone)]
pub(crate) struct RawSample {
    pub(crate) stack: Vec<u64>,
    pub(crate) count: u64,
    pub(crate) thread: String,
    /// Whether the signal frame was found (the leaf is exact).
    pub(crate) anchored: bool,
}

struct Inner {
    guard: Option<Guard>,
    /// The collector's cumulative counts at the previous checkpoint: the
    /// next epoch holds only what was added since.
    previous: Option<BaselineReport>,
    epochs: Vec<Epoch>,
    errors: Vec<String>,
}

struct Shared {
    config: ProfilerBuilder,
    inner: Mutex<Inner>,
    checkpoints: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs on the thread mutating the registry (the loader's unload path),
    /// with the registry's writer lock held. It takes only our own mutex
    /// (never held while calling into the registry's mutators) and pprof's
    /// spin lock (which the signal handler only `try_write`s).
    fn on_event(&self, ev: &Event<'_>) {
        match ev {
            Event::Unloading(m) => {
                self.checkpoint(false);
                if let ModuleKind::Anon(a) = &m.kind {
                    unwind::deregister(m.id, a.start.0);
                }
            }
            Event::Loaded(m) => {
                if let (ModuleKind::Anon(a), true) = (&m.kind, self.config.anon_unwind_info) {
                    unwind::register(m.id, a.start.0, a.len);
                }
            }
            _ => {}
        }
    }

    /// Moves the samples taken since the previous checkpoint into a new
    /// epoch, pinned to the current registry sequence number; with `last`,
    /// stops sampling.
    ///
    /// Sampling goes on meanwhile: pprof's collector keeps one cumulative
    /// count per stack (equal stacks merge, and a stack evicted from the hash
    /// table to the overflow file is summed back by `build_unresolved`), so
    /// the samples taken since the previous snapshot are the per-stack
    /// difference of the two. Restarting pprof instead costs a new collector
    /// (16 Ki entries of a 128-frame array, tens of MB, plus a temp file) per
    /// checkpoint, during which nothing is sampled.
    fn checkpoint(&self, last: bool) {
        let mut inner = self.lock();
        let Some(guard) = inner.guard.as_ref() else {
            return;
        };
        let seq = Registry::global().current_seq();
        let report = guard.0.report().build_unresolved();
        if last {
            inner.guard = None;
        }
        match report {
            Ok(r) => {
                let previous = inner.previous.take();
                let samples = delta(&r, previous.as_ref().map(|p| &p.0));
                let keep = self.config.pprof_baseline && last;
                inner.epochs.push(Epoch {
                    seq,
                    samples,
                    baseline: None,
                });
                let r = BaselineReport(r);
                if keep {
                    // Cumulative: the whole session, as pprof-rs would see it.
                    if let Some(e) = inner.epochs.last_mut() {
                        e.baseline = Some(r);
                    }
                } else if !last {
                    inner.previous = Some(r);
                }
            }
            Err(e) => inner.errors.push(format!("build_unresolved: {e}")),
        }
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
    }
}

/// The samples in `now` that were not in `before` (both cumulative
/// snapshots of one collector), as our raw samples: the frames of the signal
/// handler (everything up to and including `__restore_rt`) dropped, raw
/// instruction pointers kept.
fn delta(now: &UnresolvedReport, before: Option<&UnresolvedReport>) -> Vec<RawSample> {
    let restorer = RESTORER.load(Ordering::Relaxed);
    let mut samples = Vec::new();
    for (frames, &count) in &now.data {
        let seen = before
            .and_then(|b| b.data.get(frames))
            .copied()
            .unwrap_or(0);
        let count = count - seen;
        if count <= 0 {
            continue;
        }
        let ips: Vec<u64> = frames.frames.iter().map(|f| f.ip() as u64).collect();
        let anchor = (restorer != 0)
            .then(|| {
                ips.iter()
                    .position(|&ip| ip.wrapping_sub(restorer) < 16)
                    .map(|i| i + 1)
            })
            .flatten();
        let mut stack = ips[anchor.unwrap_or(0)..].to_vec();
        // The unwinder ends a thread's stack with a null return address (the
        // outermost frame, `clone3`'s or `_start`'s caller): not code. Kept,
        // it would show up as an unresolved location once per epoch.
        if let Some(end) = stack.iter().skip(1).position(|&ip| ip == 0) {
            stack.truncate(end + 1);
        }
        let thread =
            String::from_utf8_lossy(&frames.thread_name[..frames.thread_name_length]).into_owned();
        if !stack.is_empty() {
            samples.push(RawSample {
                stack,
                count: count as u64,
                thread,
                anchored: anchor.is_some(),
            });
        }
    }
    samples
}

/// A running profiling session. Sampling stops when it is [stopped](Self::stop)
/// or dropped.
///
/// While it runs, it is subscribed to [`Registry::global`]: before a module
/// is unregistered (e.g. by the loader, before `dlclose`), the samples taken
/// since the previous checkpoint are pinned to the registry as it is;
/// sampling goes on.
pub struct Session {
    shared: Arc<Shared>,
    subscription: Option<SubscriptionId>,
    /// `unwind::gate_counts()` when the session started.
    gate_at_start: (u64, u64),
    started: Instant,
    started_at: SystemTime,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("frequency", &self.shared.config.frequency)
            .field("checkpoints", &self.checkpoints())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A builder with the defaults.
    pub fn builder() -> ProfilerBuilder {
        ProfilerBuilder::new()
    }

    /// Checkpoints taken so far (one per module unregistered, plus manual
    /// ones).
    pub fn checkpoints(&self) -> u64 {
        self.shared.checkpoints.load(Ordering::Relaxed)
    }

    /// Checkpoints now (normally done for you before every unload).
    /// Sampling goes on.
    pub fn checkpoint(&self) {
        self.shared.checkpoint(false);
    }

    /// Stops sampling and resolves every sample through the symbolizer.
    ///
    /// # Errors
    /// None today; resolution problems show up as frames without names in
    /// [`Report::stats`].
    pub fn stop(mut self) -> Result<Report> {
        let duration = self.started.elapsed();
        let (epochs, errors) = self.finish();
        let (dropped, skipped) = unwind::gate_counts();
        let mut report = Report::resolve(
            epochs,
            errors,
            &self.shared.config.debug_search,
            self.shared.config.inline_frames,
            self.shared.config.frequency,
            self.started_at,
            duration,
        );
        report.stats.gate_dropped_samples = dropped - self.gate_at_start.0;
        report.stats.unwind_registrations_skipped = skipped - self.gate_at_start.1;
        Ok(report)
    }

    /// Stops sampling without resolving: the samples and the module
    /// history they need, to be resolved in another process
    /// ([`RawProfile::resolve`](crate::RawProfile::resolve)). Nothing of
    /// DWARF is loaded here.
    ///
    /// # Errors
    /// None today (as [`stop`](Self::stop)).
    pub fn stop_raw(mut self) -> Result<crate::RawProfile> {
        let duration = self.started.elapsed();
        let (epochs, errors) = self.finish();
        let (dropped, skipped) = unwind::gate_counts();
        // pprof-rs allocated a fresh collector as it stopped and freed the
        // old one: give the freed pages back.
        crate::capture::release_backtrace_cache();
        Ok(crate::RawProfile::capture(
            epochs,
            errors,
            self.shared.config.frequency,
            self.shared.config.inline_frames,
            self.started_at,
            duration,
            (
                dropped - self.gate_at_start.0,
                skipped - self.gate_at_start.1,
            ),
        ))
    }

    fn finish(&mut self) -> (Vec<Epoch>, Vec<String>) {
        if let Some(s) = self.subscription.take() {
            Registry::global().unsubscribe(s);
        }
        self.shared.checkpoint(true);
        let mut inner = self.shared.lock();
        let epochs = std::mem::take(&mut inner.epochs);
        let errors = std::mem::take(&mut inner.errors);
        drop(inner);
        RUNNING.store(false, Ordering::Release);
        (epochs, errors)
    }

    /// Time since start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.subscription.is_some() {
            let _ = self.finish();
        }
    }
}
