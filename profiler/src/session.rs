//! Builder -> running [`Session`] -> [`Report`]: the sampler's lifecycle and
//! its checkpoints.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use hotpatch_symbolizer::registry::{ModuleKind, SubscriptionId};
use hotpatch_symbolizer::{DebugSearch, Event, Registry};

use crate::error::{Error, Result};
use crate::phases::{self, Phase};
use crate::raw::{Captured, Epoch, RawSample, SamplerCounts, SessionFacts};
use crate::report::Report;
use crate::sampler::{self, Clock, Clocks, ThreadClock};
use crate::unwind;

/// One session at a time: SIGPROF and the sample buffer are process-wide.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Configures and starts a [`Session`].
#[derive(Debug, Clone)]
pub struct ProfilerBuilder {
    frequency: i32,
    inline_frames: bool,
    anon_unwind_info: bool,
    clock: Option<Clock>,
    debug_search: DebugSearch,
    ring_stack: u32,
}

impl Default for ProfilerBuilder {
    fn default() -> Self {
        ProfilerBuilder {
            frequency: 99,
            inline_frames: true,
            anon_unwind_info: true,
            clock: None,
            debug_search: DebugSearch::default(),
            ring_stack: crate::ring::STACK_BYTES,
        }
    }
}

impl ProfilerBuilder {
    /// Defaults: 99 Hz, inline frames, unwind info for anonymous ranges.
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples per second of each thread's CPU time (with
    /// [`Clock::ItimerProf`], of the process's).
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

    /// The clock to use, or (with `None`, the default) the best that works:
    /// [`Clock::PerfRing`], then [`Clock::PerfEvent`] (when
    /// `perf_event_open` works but the ring cannot be mapped), then
    /// [`Clock::ThreadTimer`], then [`Clock::ItimerProf`]
    /// ([`Stats::clock`](crate::Stats::clock) says which ran). A named clock that cannot be set up is an
    /// error ([`Error::Clock`]).
    pub fn clock(mut self, clock: Option<Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// With [`Clock::PerfRing`]: bytes of each thread's stack (from its
    /// stack pointer up) the kernel copies per sample for the unwinder
    /// (default 16 KiB). Frames above that are cut off the sample's stack.
    /// Rounded down to a multiple of 8 and clamped to 1-32 KiB.
    pub fn ring_stack(mut self, bytes: u32) -> Self {
        let r = crate::ring::STACK_BYTES_RANGE;
        self.ring_stack = bytes.clamp(*r.start(), *r.end()) & !7;
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
    /// [`Error::BadFrequency`]; [`Error::Clock`] when no sampling clock can be
    /// set up (or the one asked for cannot).
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
                if m.unloaded_seq.is_none() {
                    for (start, len) in synthesized_ranges(&m) {
                        unwind::register(m.id, start, len);
                    }
                }
            }
        }
        let period_ns = 1_000_000_000 / self.frequency as u64;
        let started = match start_sampling(
            self.clock,
            period_ns,
            self.anon_unwind_info,
            self.ring_stack,
        ) {
            Ok(s) => s,
            Err(e) => {
                RUNNING.store(false, Ordering::Release);
                return Err(e);
            }
        };
        let (clock, clocks, clocks_skipped) = started;
        let gate_at_start = unwind::gate_counts();
        let counters_at_start = {
            let (signals, lost) = sampler::counters();
            (signals, lost + crate::ring::counters().1)
        };
        let copies_at_start = sampler::copy_counts();
        let shared = Arc::new(Shared {
            config: self,
            clock,
            period_ns,
            inner: Mutex::new(Inner {
                current: HashMap::new(),
                epochs: Vec::new(),
                errors: Vec::new(),
                threads_clocked: clocks.by_tid.len() as u64,
                clock_failures: clocks.failed,
                clock_fallbacks: clocks.fallbacks,
                clocked: clocks.by_tid.keys().copied().collect(),
                stopped: false,
            }),
            checkpoints: AtomicU64::new(0),
            clocks: Mutex::new(clocks),
        });
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let helper = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(String::from("hotpatch-prof"))
                .spawn(move || helper(&shared, period_ns, &stop_rx))
        };
        let helper = match helper {
            Ok(h) => h,
            Err(e) => {
                stop_sampling(clock);
                RUNNING.store(false, Ordering::Release);
                return Err(Error::Clock(format!("starting the helper thread: {e}")));
            }
        };
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        {
            // A patch's `.eh_frame` about to go: unwind the samples taken so
            // far while the rings' unwinder still has it.
            let weak = weak.clone();
            unwind::set_before_eh_removal(Some(Arc::new(move || {
                if let Some(s) = weak.upgrade() {
                    s.checkpoint();
                }
            })));
        }
        let subscription = reg.subscribe(move |ev| {
            if let Some(s) = weak.upgrade() {
                s.on_event(ev);
            }
        });
        Ok(Session {
            shared,
            subscription: Some(subscription),
            helper: Some((stop_tx, helper)),
            gate_at_start,
            counters_at_start,
            copies_at_start,
            clocks_skipped,
            started: Instant::now(),
            started_at: SystemTime::now(),
        })
    }
}

/// Installs the handler (and the gate in front of it), starts recording and
/// gives every thread its clock: the first of `wanted` (or of all, best
/// first) that works.
fn start_sampling(
    wanted: Option<Clock>,
    period_ns: u64,
    gate: bool,
    ring_stack: u32,
) -> Result<(Clock, Clocks, Vec<String>)> {
    // The host handles SIGPROF itself (its own profiler): its disposition
    // is never replaced. The perf ring needs no signal (the kernel writes
    // the samples into memory), so it still runs, alone: its fallbacks,
    // which signal, are not used.
    let host_sigprof = if handler_installed() {
        None
    } else {
        foreign_sigprof()
    };
    let taken = |what: &str, more: &str| {
        Error::SignalTaken(format!(
            "SIGPROF is taken by the host ({what}){more}; the profiler does not replace a \
             host's disposition: turn the host's own profiler off (gperftools, \
             setitimer(ITIMER_PROF) users) or restart it without one"
        ))
    };
    if let Some(what) = &host_sigprof
        && !matches!(wanted, None | Some(Clock::PerfRing))
    {
        return Err(taken(what, ""));
    }
    if host_sigprof.is_none() && !handler_installed() && !sampler::install_handler() {
        return Err(Error::Clock(format!(
            "installing the SIGPROF handler: {}",
            std::io::Error::last_os_error()
        )));
    }
    if let Some(what) = &host_sigprof {
        let me = hotpatch_sys::raw::gettid();
        let pages =
            crate::ring::data_pages(period_ns, crate::ring::ring_interval(period_ns), ring_stack);
        return match crate::ring::open_within_budget(me, period_ns, pages, ring_stack) {
            Ok(r) => {
                drop(r);
                sampler::activate(Clock::PerfRing, period_ns);
                let mut clocks = Clocks::new();
                clocks.ring_pages = pages;
                clocks.ring_stack = ring_stack;
                clocks.ring_only = true;
                clocks.sync(Clock::PerfRing, period_ns);
                let why = vec![format!(
                    "signal clocks: SIGPROF is taken by the host ({what}); perf-ring only, \
                     threads without a ring are not sampled"
                )];
                Ok((Clock::PerfRing, clocks, why))
            }
            Err(e) => Err(taken(what, &format!(" and the perf ring is refused ({e})"))),
        };
    }
    if gate {
        // Unwind info registered from now on goes through the gate
        // (unwind.rs): no sample's unwind may sort a fresh object.
        unwind::install_gate();
    }
    let order: Vec<Clock> = match wanted {
        Some(c) => vec![c],
        None => vec![
            Clock::PerfRing,
            Clock::PerfEvent,
            Clock::ThreadTimer,
            Clock::ItimerProf,
        ],
    };
    let mut why = Vec::new();
    for clock in order {
        sampler::activate(clock, period_ns);
        if clock == Clock::ItimerProf {
            match sampler::itimer(Some(period_ns)) {
                Ok(()) => return Ok((clock, Clocks::default(), why)),
                Err(e) => why.push(format!("{clock}: {e}")),
            }
            continue;
        }
        // Probe on this thread first: the error says why a clock is refused.
        let me = hotpatch_sys::raw::gettid();
        let pages =
            crate::ring::data_pages(period_ns, crate::ring::ring_interval(period_ns), ring_stack);
        let probe = match clock {
            Clock::PerfEvent => sampler::perf_clock(me, period_ns),
            Clock::PerfRing => crate::ring::open_within_budget(me, period_ns, pages, ring_stack)
                .map(ThreadClock::Ring),
            _ => sampler::timer_clock(me, period_ns),
        };
        match probe {
            Ok(c) => {
                // The listing gives every thread (this one included) its
                // clock, keyed by which thread it is.
                drop(c);
                let mut clocks = Clocks::new();
                clocks.ring_pages = pages;
                clocks.ring_stack = ring_stack;
                clocks.sync(clock, period_ns);
                return Ok((clock, clocks, why));
            }
            Err(e) => why.push(format!("{clock}: {e}")),
        }
    }
    sampler::deactivate();
    Err(Error::Clock(why.join("; ")))
}

/// What SIGPROF's disposition is when the host set one (a handler that is
/// not ours, or `SIG_IGN`); `None` for `SIG_DFL` or ours.
fn foreign_sigprof() -> Option<String> {
    let cur = hotpatch_sys::signal::query_action(libc::SIGPROF).ok()?;
    if cur.sa_sigaction == libc::SIG_DFL || handler_installed() {
        return None;
    }
    Some(if cur.sa_sigaction == libc::SIG_IGN {
        "SIG_IGN".to_string()
    } else {
        format!("handler at {:#x}", cur.sa_sigaction)
    })
}

/// Whether SIGPROF's handler is the sampler's (directly or behind the gate).
fn handler_installed() -> bool {
    let Ok(cur) = hotpatch_sys::signal::query_action(libc::SIGPROF) else {
        return false;
    };
    sampler::is_handler(&cur) || unwind::gate_installed(&cur)
}

fn stop_sampling(clock: Clock) {
    if clock == Clock::ItimerProf {
        let _ = sampler::itimer(None);
    }
}

/// The session's helper thread: every [`sampler::watch_interval`] (with
/// perf-ring: [`crate::ring::ring_interval`], shortened by
/// [`crate::ring::drain_interval`] when a ring would fill first), gives new
/// threads their clock and drains the sample buffer and the rings; returns
/// (dropping every clock) when told to stop.
fn helper(shared: &Shared, period_ns: u64, stop: &Receiver<()>) {
    let mut interval = sampler::watch_interval(period_ns);
    {
        // This thread is the profiler's own: it gets no clock (its samples
        // would show the profiler, and a clock on it costs each of its
        // wakes a perf context switch).
        let mut c = shared.lock_clocks();
        c.skip_tid(hotpatch_sys::raw::gettid());
        if shared.clock == Clock::PerfRing {
            interval = c.ring_drain_interval(period_ns);
        }
    }
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
        phases::time(Phase::Wake, || {
            // Lock order: clocks, then inner (as `checkpoint`).
            let mut clocks = shared.lock_clocks();
            let before = clocks.by_tid.len();
            let added = phases::time(Phase::Threads, || clocks.sync(shared.clock, period_ns));
            let mut inner = shared.lock();
            inner.threads_clocked += added as u64;
            inner.clock_failures = clocks.failed;
            inner.clock_fallbacks = clocks.fallbacks;
            if added > 0 || clocks.by_tid.len() != before {
                inner.clocked = clocks.by_tid.keys().copied().collect();
            }
            let Inner { current, .. } = &mut *inner;
            phases::time(Phase::Buffer, || drain_into(&mut clocks, current));
            phases::time(Phase::Rings, || {
                drain_rings_into(&mut clocks, period_ns, current)
            });
            if shared.clock == Clock::PerfRing {
                // A ring opened since may be a smaller one (the mlock
                // budget's fallback), which must be drained sooner.
                interval = clocks.ring_drain_interval(period_ns);
            }
        });
    }
}

/// Unwinds the samples of every ring ([`Clock::PerfRing`]) into `acc`.
fn drain_rings_into(clocks: &mut Clocks, period_ns: u64, acc: &mut Acc) {
    clocks.drain_rings(period_ns, |d| {
        if d.stack.is_empty() {
            return;
        }
        phases::time(Phase::Accumulate, || {
            let e = acc.entry((d.stack, d.name, d.anchored)).or_default();
            e.0 += 1;
            e.1 += d.value_ns;
        });
    });
}

/// Samples of one epoch being collected: per (stack, thread, anchored), the
/// count and the CPU time.
type Acc = HashMap<(Vec<u64>, String, bool), (u64, u64)>;

/// Unwinds the signal handlers' copies (every clock but
/// [`Clock::PerfRing`]) into `acc`, with the rings' unwinder.
fn drain_into(clocks: &mut Clocks, acc: &mut Acc) {
    let unwinder = &mut clocks.ring;
    let mut synced = false;
    let unwind = |c: &sampler::Copied<'_>| {
        if !synced {
            unwinder.sync();
            synced = true;
        }
        unwinder.unwind_copy(c.rip, c.rsp, c.rbp, c.stack)
    };
    sampler::drain(unwind, |d| {
        if d.stack.is_empty() {
            return;
        }
        let e = acc.entry((d.stack, d.name, d.anchored)).or_default();
        e.0 += 1;
        e.1 += d.value_ns;
    });
}

struct Inner {
    /// Samples since the previous checkpoint.
    current: Acc,
    epochs: Vec<Epoch>,
    errors: Vec<String>,
    /// Threads given a clock (at start and since).
    threads_clocked: u64,
    /// Threads whose clock could not be set up.
    clock_failures: u64,
    /// Threads on a thread timer for want of a file descriptor.
    clock_fallbacks: u64,
    /// The threads that have their own clock now.
    clocked: Vec<i32>,
    stopped: bool,
}

struct Shared {
    config: ProfilerBuilder,
    clock: Clock,
    period_ns: u64,
    inner: Mutex<Inner>,
    checkpoints: AtomicU64,
    /// Every thread's clock (and the rings' unwinder). Locked before
    /// `inner` when both are needed.
    clocks: Mutex<Clocks>,
}

/// The ranges of `m` whose unwind info is synthesized from its code: an
/// anonymous range, or each executable segment of an ELF module that has no
/// bytes in its file (code placed by other means, e.g. a generation of
/// `hotpatch watch`, whose module file holds only its DWARF and symbols).
fn synthesized_ranges(m: &hotpatch_symbolizer::Module) -> Vec<(u64, u64)> {
    match &m.kind {
        ModuleKind::Anon(a) => vec![(a.start.0, a.len)],
        ModuleKind::Elf(e) => e
            .segments
            .iter()
            .filter(|s| s.is_exec() && s.filesz == 0 && s.memsz > 0)
            .map(|s| (e.bias.to_runtime(s.vaddr).0, s.memsz))
            .collect(),
        _ => Vec::new(),
    }
}

impl Shared {
    fn lock_clocks(&self) -> MutexGuard<'_, Clocks> {
        self.clocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs on the thread mutating the registry (the loader's unload path),
    /// with the registry's writer lock held. It takes only our own mutex
    /// (never held while calling into the registry's mutators); the signal
    /// spin lock (which the signal handler only `try_write`s).
    fn on_event(&self, ev: &Event<'_>) {
        match ev {
            Event::Unloading(m) => {
                self.checkpoint();
                for (start, _) in synthesized_ranges(m) {
                    unwind::deregister(m.id, start);
                }
            }
            Event::Loaded(m) if self.config.anon_unwind_info => {
                for (start, len) in synthesized_ranges(m) {
                    unwind::register(m.id, start, len);
                }
            }
            _ => {}
        }
    }

    /// Moves the samples taken since the previous checkpoint into a new
    /// epoch, pinned to the current registry sequence number. Sampling goes
    /// on meanwhile: the drain only empties the buffer's ready slots.
    ///
    /// Slots being written at this instant (a handler on another thread,
    /// preempted mid-sample) are waited for briefly, so that a sample taken
    /// before the checkpoint lands in its epoch; a handler that does not
    /// finish within 20 ms has its sample go to the next epoch.
    fn checkpoint(&self) {
        let mut clocks = self.lock_clocks();
        let mut inner = self.lock();
        if inner.stopped {
            return;
        }
        let seq = Registry::global().current_seq();
        let writing = sampler::writing();
        let t = Instant::now();
        while writing.iter().any(|&i| sampler::still_writing(i))
            && t.elapsed() < Duration::from_millis(20)
        {
            std::thread::yield_now();
        }
        drain_into(&mut clocks, &mut inner.current);
        // The rings' samples are unwound now, while every module they may
        // lie in is still mapped and registered.
        drain_rings_into(&mut clocks, self.period_ns, &mut inner.current);
        drop(clocks);
        let samples = std::mem::take(&mut inner.current)
            .into_iter()
            .map(|((stack, thread, anchored), (count, value_ns))| RawSample {
                stack,
                count,
                thread,
                anchored,
                value_ns,
            })
            .collect();
        inner.epochs.push(Epoch { seq, samples });
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
    }
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
    /// The helper thread and the channel that stops it.
    helper: Option<(Sender<()>, std::thread::JoinHandle<()>)>,
    /// `unwind::gate_counts()` when the session started.
    gate_at_start: (u64, u64, u64),
    /// `sampler::counters()` when the session started (lost: plus the
    /// rings' lost records).
    counters_at_start: (u64, u64),
    /// Why the clocks tried before the session's were skipped.
    clocks_skipped: Vec<String>,
    /// [`sampler::copy_counts`] at start.
    copies_at_start: (u64, u64, u64),
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
        self.shared.checkpoint();
    }

    /// Stops sampling and resolves every sample through the symbolizer.
    ///
    /// # Errors
    /// None today; resolution problems show up as frames without names in
    /// [`Report::stats`].
    pub fn stop(mut self) -> Result<Report> {
        let duration = self.started.elapsed();
        let (epochs, errors) = self.finish();
        let facts = self.facts();
        let captured = self.captured(epochs, errors, duration);
        let mut report = Report::resolve(captured, &self.shared.config.debug_search);
        report.apply_facts(&facts);
        Ok(report)
    }

    /// Stops sampling without resolving: the samples and the module
    /// history they need, to be resolved in another process
    /// ([`RawProfile::resolve`](crate::capture::RawProfile::resolve)). Nothing of
    /// DWARF is loaded here.
    ///
    /// # Errors
    /// None today (as [`stop`](Self::stop)).
    pub fn stop_raw(mut self) -> Result<crate::capture::RawProfile> {
        let duration = self.started.elapsed();
        let (epochs, errors) = self.finish();
        let facts = self.facts();
        // The session's aggregation maps were freed: give the pages back.
        crate::capture::release_backtrace_cache();
        let captured = self.captured(epochs, errors, duration);
        Ok(crate::capture::RawProfile::capture(captured, facts))
    }

    /// The session's samples and what a report says about it.
    fn captured(&self, epochs: Vec<Epoch>, errors: Vec<String>, duration: Duration) -> Captured {
        Captured {
            epochs,
            errors,
            inline_frames: self.shared.config.inline_frames,
            frequency: self.shared.config.frequency,
            start_time: self.started_at,
            duration,
            main_executable: crate::raw::current_executable(),
        }
    }

    /// The clock and the sampler's and the gate's counters since start.
    fn facts(&self) -> SessionFacts {
        let (dropped, skipped, abandoned) = unwind::gate_counts();
        let (signals, lost) = sampler::counters();
        let (_, ring_lost) = crate::ring::counters();
        let lost = lost + ring_lost;
        let copies = sampler::copy_counts();
        let inner = self.shared.lock();
        SessionFacts {
            gate: (
                dropped - self.gate_at_start.0,
                skipped - self.gate_at_start.1,
            ),
            clock: self.shared.clock,
            sampler: SamplerCounts {
                handlers_left_by_jump: abandoned - self.gate_at_start.2,
                signals: signals - self.counters_at_start.0,
                lost_buffer_full: lost - self.counters_at_start.1,
                threads_clocked: inner.threads_clocked,
                thread_clock_failures: inner.clock_failures,
                thread_clock_fallbacks: inner.clock_fallbacks,
                clocks_skipped: self.clocks_skipped.clone(),
                empty_stack_copies: copies.0 - self.copies_at_start.0,
                truncated_stack_copies: copies.1 - self.copies_at_start.1,
                late_samples_discarded: copies.2 - self.copies_at_start.2,
            },
        }
    }

    fn finish(&mut self) -> (Vec<Epoch>, Vec<String>) {
        if let Some(s) = self.subscription.take() {
            Registry::global().unsubscribe(s);
            unwind::set_before_eh_removal(None);
        }
        if let Some((tx, h)) = self.helper.take() {
            let _ = tx.send(());
            // The helper drops every thread's clock on its way out.
            if h.join().is_err() {
                self.shared
                    .lock()
                    .errors
                    .push(String::from("the profiler's helper thread panicked"));
            }
        }
        stop_sampling(self.shared.clock);
        // Signal clocks go; rings stop but keep their records for the last
        // checkpoint's drain.
        self.shared.lock_clocks().stop_all();
        self.shared.checkpoint();
        // Closes the rings.
        drop(std::mem::take(&mut *self.shared.lock_clocks()));
        sampler::deactivate();
        let mut inner = self.shared.lock();
        inner.stopped = true;
        let epochs = std::mem::take(&mut inner.epochs);
        let errors = std::mem::take(&mut inner.errors);
        drop(inner);
        RUNNING.store(false, Ordering::Release);
        (epochs, errors)
    }

    /// The ids of the threads that have their own sampling clock now
    /// (empty with [`Clock::ItimerProf`], which samples the process).
    /// Threads started after [`ProfilerBuilder::start`] appear at the
    /// helper's next wake (perf-ring: every six periods, 20-100 ms; other
    /// clocks: 10-40 ms). When another thread exited meanwhile, leaving
    /// the thread count as it was, that is seen at the same wake if the
    /// exited thread had a perf clock (its event's `POLLHUP`), else at the
    /// next full listing, up to 100 ms later (1 s when every thread's clock
    /// is a perf event).
    pub fn clocked_threads(&self) -> Vec<i32> {
        self.shared.lock().clocked.clone()
    }

    /// The clock that drives this session.
    pub fn clock(&self) -> Clock {
        self.shared.clock
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
