//! The sampling path: per-thread CPU clocks, a SIGPROF handler that writes
//! raw stacks into a preallocated lock-free buffer, and the drain that turns
//! them into [`RawSample`]s.
//!
//! # Clocks
//!
//! Each thread is sampled by its own CPU clock, so a thread busy 25% of the
//! time gets a quarter of a busy thread's samples (one process-wide
//! `ITIMER_PROF`, checked once per kernel tick and delivered to whichever
//! thread runs, does not: golang/go#35057). In order of preference:
//!
//! 0. [`Clock::PerfRing`] (the default since issue #12: the lowest
//!    measured overhead, BENCHMARKS.md): the same per-thread perf event,
//!    but the kernel writes each sample (registers and the top of the
//!    stack) into a ring per thread, no signal (`ring.rs`). A thread whose
//!    ring cannot be mapped gets the next clock.
//! 1. [`Clock::PerfEvent`]: a `perf_event_open` software `cpu-clock` event per
//!    thread (hrtimer-based, not capped by the tick), its overflow signal
//!    routed to that thread (`F_SETOWN_EX`/`F_OWNER_TID`, `F_SETSIG`,
//!    `O_ASYNC`). User-mode only (`exclude_kernel`, as
//!    `perf_event_paranoid` 2 allows for one's own threads): a period that
//!    ends in the kernel is not sampled.
//! 2. [`Clock::ThreadTimer`]: `timer_create(CLOCK_THREAD_CPUTIME_ID-of-tid,
//!    SIGEV_THREAD_ID)`. Checked at the tick, so at 999 Hz on a 250 Hz
//!    kernel a signal stands for several periods: its `si_overrun` says how
//!    many, and the sample's value carries them.
//! 3. [`Clock::ItimerProf`]: the process-wide timer, last resort.
//!
//! Threads that exist at start get their clock before `start()` returns;
//! threads started later are found by the session's helper thread, which
//! checks the thread count every [`watch_interval`] (one `fstat`) and lists
//! `/proc/self/task` when it changed, when a thread with a perf clock has
//! exited (its event reports `POLLHUP`: one `poll`), or
//! [`FULL_SCAN_INTERVAL`] after the last listing
//! ([`FULL_SCAN_INTERVAL_POLLED`] when every clock is a perf ring: only a
//! ring's event says by `POLLHUP` that its thread exited) (see
//! docs/DESIGN-NOTES.md, "per-thread clocks" and "where a
//! sample's cost goes", for what a new thread's first milliseconds lose).
//!
//! # The handler
//!
//! Async-signal-safe: atomics and system calls (`gettid`, `prctl`,
//! `process_vm_readv`), no unwinding. It claims a free slot of [`SLOTS`]
//! with a CAS, writes the interrupted `rip`, `rsp` and `rbp` (from the
//! `ucontext`, exact), a copy of the top [`STACK_BYTES`] of the thread's
//! stack from `rsp` up (as the kernel does for [`Clock::PerfRing`]), the
//! thread id and name, and the CPU time the sample stands for, and marks the
//! slot ready. No allocation, no lock. When every slot is taken the sample
//! is counted as lost.
//!
//! The session's helper thread unwinds the copies with the same `framehop`
//! unwinder as the perf rings' samples (`ring.rs`), at every drain and at
//! every checkpoint (before a module unloads). The handler used to unwind
//! with libgcc's `_Unwind_Backtrace`, which takes libgcc's `object_mutex`:
//! a signal landing on a thread that was itself unwinding (a panic, a
//! backtrace) and held it deadlocked that thread (docs/DESIGN-NOTES.md,
//! "libgcc's object_mutex and the sampler").

use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

pub(crate) use crate::drained::Drained;
/// Samples the buffer holds between two drains (at 1 kHz on 2 cores a
/// drain every 10-40 ms finds at most ~80).
pub(crate) const SLOTS: usize = 1024;
/// Bytes of stack the handler copies per sample, from the interrupted
/// `rsp` up (the perf rings' default, [`crate::ring::STACK_BYTES`]).
pub(crate) const STACK_BYTES: usize = crate::ring::STACK_BYTES as usize;
/// The shortest interval at which the helper thread drains the buffer and
/// looks for new threads (a one-`fstat` check of the thread count).
pub(crate) const WATCH_INTERVAL: Duration = Duration::from_millis(10);
/// The longest one (see [`watch_interval`]).
pub(crate) const WATCH_INTERVAL_MAX: Duration = Duration::from_millis(40);

/// How often the helper wakes for a sampling period of `period_ns`: four
/// periods, within [`WATCH_INTERVAL`]..=[`WATCH_INTERVAL_MAX`]. Each wake
/// costs the process ~70 µs of CPU on the 2-core VM (measured: the helper's
/// 5-6 ms per 0.75 s at a 10 ms interval, `cargo bench -p hotpatch-profiler
/// --bench overhead`, BENCHMARKS.md), which at 99 Hz was more than the
/// samples themselves; a thread started during a session waits at most one
/// interval — four sampling periods — for its clock.
pub(crate) fn watch_interval(period_ns: u64) -> Duration {
    Duration::from_nanos(period_ns.saturating_mul(4)).clamp(WATCH_INTERVAL, WATCH_INTERVAL_MAX)
}
/// How often the thread list is read even though the thread count did not
/// change (see [`Clocks::sync`]).
pub(crate) const FULL_SCAN_INTERVAL: Duration = Duration::from_millis(100);
/// The same when every thread's clock is a perf ring (a signalled perf
/// event reports `POLLHUP` always, having no ring): a clocked thread that exits is seen at once by its
/// event's `POLLHUP`, so what this catches is only a thread without a
/// clock (one whose clock failed, the helper) exiting as another starts.
/// Listing every 100 ms was ~60-80 µs each, ~0.6 ms of the helper's
/// ~5 ms per 0.75 s session at 1 kHz (BENCHMARKS.md).
pub(crate) const FULL_SCAN_INTERVAL_POLLED: Duration = Duration::from_secs(1);

/// Which clock drove a session's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Clock {
    /// A `perf_event_open` software cpu-clock event per thread, its
    /// overflow signalled to the thread.
    PerfEvent,
    /// A `timer_create(CLOCK_THREAD_CPUTIME_ID)` timer per thread.
    ThreadTimer,
    /// The process-wide `setitimer(ITIMER_PROF)`.
    ItimerProf,
    /// A perf cpu-clock event per thread whose samples (registers and a
    /// copy of the top of the user stack) the kernel writes into a ring
    /// buffer, unwound by the session's helper: no signal per sample.
    /// The default (see `ring.rs` and docs/DESIGN-NOTES.md).
    #[default]
    PerfRing,
}

impl Clock {
    /// A short stable name (`perf-event`, `thread-timer`, `itimer-prof`,
    /// `perf-ring`).
    pub fn name(self) -> &'static str {
        match self {
            Clock::PerfEvent => "perf-event",
            Clock::ThreadTimer => "thread-timer",
            Clock::ItimerProf => "itimer-prof",
            Clock::PerfRing => "perf-ring",
        }
    }

    /// The clock called `name` by [`name`](Self::name), if any.
    pub fn from_name(name: &str) -> Option<Clock> {
        [
            Clock::PerfEvent,
            Clock::ThreadTimer,
            Clock::ItimerProf,
            Clock::PerfRing,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }
}

impl std::fmt::Display for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const FREE: u32 = 0;
const WRITING: u32 = 1;
const READY: u32 = 2;

/// Bytes of the sample buffer the handlers write into ([`SLOTS`] slots),
/// allocated when sampling first starts and kept for the process's life.
/// Its pages are zero pages until a handler writes a slot, and handlers
/// take the lowest free slot: what is resident is what the largest backlog
/// between two drains needed.
pub(crate) fn buffer_bytes() -> usize {
    SLOTS * std::mem::size_of::<Slot>() + std::mem::size_of_val(&STATES)
}

/// One sample as the handler writes it; its state is `STATES[i]`.
struct Slot {
    data: UnsafeCell<SlotData>,
}

/// The state of each slot (FREE, WRITING, READY), apart from the slots'
/// data: the drain, every [`watch_interval`], reads all of them, and 16 KiB
/// of states are 4 pages, where states inside the ~1 KiB slots were 4,096
/// cache lines over ~1,100 pages (measured in BENCHMARKS.md, "overhead").
static STATES: [AtomicU32; SLOTS] = [const { AtomicU32::new(FREE) }; SLOTS];

/// All-zero bytes are a valid value (the buffer is allocated zeroed).
struct SlotData {
    rip: u64,
    rsp: u64,
    rbp: u64,
    value_ns: u64,
    tid: i32,
    /// Bytes of `stack` copied (0 when `rsp` was unreadable).
    len: u32,
    /// The session the sample was taken in ([`SESSION`] when the handler
    /// passed the ACTIVE check).
    session: u32,
    name: [u8; 16],
    stack: [u8; STACK_BYTES],
}

// SAFETY: `data` of slot `i` is written only by the one handler that moved
// `STATES[i]` from FREE to WRITING, and read only by the drain after it saw
// READY (Acquire, paired with the handler's Release); the drain stores FREE
// (Release) after its read. No two parties access `data` at once.
unsafe impl Sync for Slot {}

/// The buffer: allocated once, on the first session, and never freed (a
/// late signal may still be writing into it after a session ended).
static BUFFER: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
/// Whether handlers record (false between sessions).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The clock of the running session, as `Clock as u32`.
static CLOCK: AtomicU32 = AtomicU32::new(0);
/// One period in nanoseconds.
static PERIOD_NS: AtomicU64 = AtomicU64::new(0);
/// Samples lost because every slot was taken.
static LOST_FULL: AtomicU64 = AtomicU64::new(0);
/// Signals the handler saw while active (recorded or not).
static SIGNALS: AtomicU64 = AtomicU64::new(0);
/// The current session's number (bumped by [`activate`]): a sample
/// tagged with another one was taken by a handler that passed the ACTIVE
/// check of an earlier session and finished late; the drain discards it.
static SESSION: AtomicU32 = AtomicU32::new(0);
/// Samples whose stack copy was empty (`rsp` unreadable: the sample is its
/// leaf alone, unanchored).
static EMPTY_COPIES: AtomicU64 = AtomicU64::new(0);
/// Samples whose stack copy filled the whole [`STACK_BYTES`] (the stack
/// may go on above: the unwind may stop early).
static TRUNCATED_COPIES: AtomicU64 = AtomicU64::new(0);
/// Samples of an earlier session discarded by the drain.
static LATE_DISCARDED: AtomicU64 = AtomicU64::new(0);
/// Allocates the buffer if it is not yet (outside any handler). Without
/// it (an allocation refused) handlers drop their samples.
fn allocate_buffer() {
    let p = BUFFER.load(Ordering::Acquire);
    if p.is_null() {
        // SLOTS slots of a fixed size: cannot overflow.
        let Ok(layout) = std::alloc::Layout::array::<Slot>(SLOTS) else {
            return;
        };
        // SAFETY: a non-zero-sized layout; all-zero bytes are a valid `Slot`
        // (integers and byte arrays in an UnsafeCell). Zeroed, so the
        // allocator hands out fresh zero pages (calloc of a large block is
        // an mmap) that become resident only when written.
        let fresh = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Slot>();
        if fresh.is_null() {
            return;
        }
        if BUFFER
            .compare_exchange(
                std::ptr::null_mut(),
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            // SAFETY: `fresh` came from alloc_zeroed with this layout just
            // above and was never published.
            unsafe { std::alloc::dealloc(fresh.cast(), layout) };
        }
    }
}

/// The buffer if allocated, without allocating (for the handler).
fn buffer_if_any() -> Option<&'static [Slot]> {
    let p = BUFFER.load(Ordering::Acquire);
    // SAFETY: a non-null `p` points to SLOTS slots that are never freed.
    (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts(p, SLOTS) })
}

/// `si_code` of a signal sent by `tgkill` (our gate's probe): not a sample.
const SI_TKILL: i32 = -6;
/// `si_code` of a POSIX timer's signal.
const SI_TIMER: i32 = -2;

/// The SIGPROF handler. Async-signal-safe (see the module docs).
pub(crate) extern "C" fn on_sigprof(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    // SAFETY: errno is thread-local; we restore what the interrupted code saw.
    let errno = unsafe { *libc::__errno_location() };
    record(info, uc);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn record(info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // Read before the ACTIVE check: a handler that passes the check of one
    // session and finishes after the next one started keeps the earlier
    // session's number (`activate` bumps it before setting ACTIVE).
    let session = SESSION.load(Ordering::Acquire);
    if !ACTIVE.load(Ordering::Acquire) || info.is_null() || uc.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code == SI_TKILL {
        return;
    }
    SIGNALS.fetch_add(1, Ordering::Relaxed);
    let Some(buf) = buffer_if_any() else { return };
    let period = PERIOD_NS.load(Ordering::Relaxed);
    // A thread timer's signal (SI_TIMER) may stand for several periods; a
    // session on perf events may have timers too (threads that got no fd).
    let periods = if code == SI_TIMER {
        // SAFETY: for a POSIX timer's signal the kernel fills the `_timer`
        // member: si_tid (int) at offset 16, si_overrun (int) at 20; the
        // siginfo_t is 128 bytes.
        let overrun = unsafe { info.cast::<u8>().add(20).cast::<i32>().read_unaligned() };
        1 + u64::try_from(overrun.max(0)).unwrap_or(0)
    } else {
        1
    };
    // The lowest free slot: the buffer's pages stay untouched (not
    // resident) beyond the largest backlog a drain found.
    let mut claimed = None;
    for (i, state) in STATES.iter().enumerate() {
        if state.load(Ordering::Relaxed) == FREE
            && state
                .compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            claimed = Some(i);
            break;
        }
    }
    let Some(i) = claimed else {
        LOST_FULL.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // SAFETY: we moved the slot from FREE to WRITING: it is ours alone until
    // we store READY (see `Slot`).
    let d = unsafe { &mut *buf[i].data.get() };
    // SAFETY: `uc` is the kernel's ucontext_t for this signal.
    let gregs = unsafe { &(*uc.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    d.rip = gregs[libc::REG_RIP as usize] as u64;
    d.rsp = gregs[libc::REG_RSP as usize] as u64;
    d.rbp = gregs[libc::REG_RBP as usize] as u64;
    d.value_ns = period.saturating_mul(periods);
    d.session = session;
    // Inside the handler: `sys::raw::gettid` is a raw, argued syscall (no
    // libc wrapper, no errno), async-signal-safe.
    d.tid = hotpatch_sys::raw::gettid();
    d.name = [0; 16];
    // Inside the handler: libc's `prctl` stays (a thin syscall wrapper,
    // async-signal-safe; `sys::raw::prctl` takes no pointer argument).
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer given.
    unsafe { libc::prctl(libc::PR_GET_NAME, d.name.as_mut_ptr()) };
    // The top of the stack, for the helper's unwinder: no unwinding here
    // (libgcc's unwinder takes a mutex the interrupted thread may hold).
    // `process_vm_readv` stops at the first unreadable page, where a plain
    // copy would fault (past the stack's mapping if a readable one follows).
    d.len = hotpatch_sys::stackcopy::read_self_prefix(d.rsp as usize, &mut d.stack) as u32;
    STATES[i].store(READY, Ordering::Release);
}

/// Installs [`on_sigprof`] for SIGPROF (SA_SIGINFO | SA_RESTART). Returns
/// false if `sigaction` fails.
pub(crate) fn install_handler() -> bool {
    // SAFETY: sigaction is plain data; zeroed is a valid value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigprof as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // Every signal but the synchronous faults is blocked while the handler
    // runs: another signal's handler could otherwise interrupt `record`
    // and leave by `siglongjmp`, and the slot it held would stay WRITING
    // for good (every checkpoint would then wait for it). A fault inside
    // the handler is a bug; a blocked synchronous fault would kill the
    // process without running the host's handler, so those stay open.
    let faults = [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGTRAP,
    ];
    let all: Vec<i32> = (1..=libc::SIGRTMAX())
        .filter(|s| !faults.contains(s))
        .collect();
    act.sa_mask = hotpatch_sys::signal::sigset_of(&all);
    // SAFETY: installs an async-signal-safe handler (above) of the
    // SA_SIGINFO signature, a static function; glibc supplies the restorer.
    unsafe { hotpatch_sys::signal::swap_action(libc::SIGPROF, &act) }.is_ok()
}

/// Whether `act` (SIGPROF's disposition) is our handler itself.
pub(crate) fn is_handler(act: &libc::sigaction) -> bool {
    act.sa_sigaction == on_sigprof as *const () as usize
}

/// Starts recording with `period_ns` per sample under `clock`, as a new
/// session: samples an earlier session's late handlers leave in the buffer
/// are discarded (here, and by the drain for those still being written).
pub(crate) fn activate(clock: Clock, period_ns: u64) {
    allocate_buffer();
    SESSION.fetch_add(1, Ordering::AcqRel);
    for state in &STATES {
        if state
            .compare_exchange(READY, FREE, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            LATE_DISCARDED.fetch_add(1, Ordering::Relaxed);
        }
    }
    PERIOD_NS.store(period_ns, Ordering::Relaxed);
    CLOCK.store(clock as u32, Ordering::Relaxed);
    ACTIVE.store(true, Ordering::Release);
}

/// Stops recording (late signals are ignored).
pub(crate) fn deactivate() {
    ACTIVE.store(false, Ordering::Release);
}

/// Counters: (signals seen, samples lost to a full buffer).
pub(crate) fn counters() -> (u64, u64) {
    (
        SIGNALS.load(Ordering::Relaxed),
        LOST_FULL.load(Ordering::Relaxed),
    )
}

/// Stack copies counted by the drain so far: (empty, truncated at
/// [`STACK_BYTES`], samples of an earlier session discarded).
pub(crate) fn copy_counts() -> (u64, u64, u64) {
    (
        EMPTY_COPIES.load(Ordering::Relaxed),
        TRUNCATED_COPIES.load(Ordering::Relaxed),
        LATE_DISCARDED.load(Ordering::Relaxed),
    )
}

/// One sample as the handler copied it, for the unwinder.
pub(crate) struct Copied<'a> {
    pub rip: u64,
    pub rsp: u64,
    pub rbp: u64,
    /// The stack from `rsp` up.
    pub stack: &'a [u8],
}

/// Moves every ready sample out of the buffer: `unwind` turns each copy
/// into its stack (leaf first), before the slot is freed.
pub(crate) fn drain(
    mut unwind: impl FnMut(&Copied<'_>) -> Vec<u64>,
    mut each: impl FnMut(Drained),
) {
    let Some(buf) = buffer_if_any() else { return };
    for (slot, state) in buf.iter().zip(&STATES) {
        if state.load(Ordering::Acquire) != READY {
            continue;
        }
        // SAFETY: READY: the handler is done with it and nobody else reads
        // it (only the drain, under the session's clocks mutex) until we
        // store FREE below.
        let d: &SlotData = unsafe { &*slot.data.get() };
        if d.session != SESSION.load(Ordering::Acquire) {
            // A late handler of an earlier session.
            state.store(FREE, Ordering::Release);
            LATE_DISCARDED.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let copied_len = (d.len as usize).min(STACK_BYTES);
        if copied_len == 0 {
            EMPTY_COPIES.fetch_add(1, Ordering::Relaxed);
        } else if copied_len == STACK_BYTES {
            TRUNCATED_COPIES.fetch_add(1, Ordering::Relaxed);
        }
        let copied = Copied {
            rip: d.rip,
            rsp: d.rsp,
            rbp: d.rbp,
            stack: &d.stack[..copied_len],
        };
        let stack = unwind(&copied);
        let len = d.name.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&d.name[..len]).into_owned();
        let value_ns = d.value_ns;
        state.store(FREE, Ordering::Release);
        each(Drained {
            stack,
            // Without a copy the stack is the leaf alone.
            anchored: copied_len > 0,
            name,
            value_ns,
        });
    }
}

/// Whether any slot is being written right now.
pub(crate) fn writing() -> Vec<usize> {
    STATES
        .iter()
        .enumerate()
        .filter(|(_, s)| s.load(Ordering::Acquire) == WRITING)
        .map(|(i, _)| i)
        .collect()
}

/// Whether slot `i` is still being written.
pub(crate) fn still_writing(i: usize) -> bool {
    STATES[i].load(Ordering::Acquire) == WRITING
}

// ---------------------------------------------------------------------------
// Clocks.

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
/// `perf_event_attr` flag bits.
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_EXCLUDE_KERNEL: u64 = 1 << 5;
const ATTR_EXCLUDE_HV: u64 = 1 << 6;
/// `PERF_EVENT_IOC_ENABLE` = `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// `PERF_EVENT_IOC_DISABLE` = `_IO('$', 1)`.
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct perf_event_attr`, its first 64 bytes (`PERF_ATTR_SIZE_VER0`).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// A thread's clock, closed on drop.
#[derive(Debug)]
pub(crate) enum ThreadClock {
    Perf(libc::c_int),
    Timer(libc::timer_t),
    /// A perf event with its ring ([`crate::ring::Ring`] closes itself).
    Ring(crate::ring::Ring),
}

// SAFETY: a perf fd and a timer id are plain handles, usable from any thread.
unsafe impl Send for ThreadClock {}

impl Drop for ThreadClock {
    fn drop(&mut self) {
        match *self {
            // Disable before closing: a child forked (without exec) while
            // the session ran holds copies of the fd, and the event lives
            // while any fd refers to it; enabled, it would go on signalling
            // our thread after the session ended (EINTR in its
            // non-restarting calls). Disabling stops the event for every fd.
            // Timers need no such care: timer_create's timers are not
            // inherited by fork.
            // SAFETY: our own fd, disabled and closed once.
            ThreadClock::Perf(fd) => unsafe {
                libc::ioctl(fd, PERF_EVENT_IOC_DISABLE, 0);
                libc::close(fd);
            },
            // SAFETY: our own timer, deleted once.
            ThreadClock::Timer(t) => unsafe {
                libc::timer_delete(t);
            },
            ThreadClock::Ring(_) => {}
        }
    }
}

/// Opens a perf cpu-clock event on thread `tid` whose overflow signals
/// SIGPROF to that thread every `period_ns` of its CPU time.
pub(crate) fn perf_clock(tid: i32, period_ns: u64) -> std::io::Result<ThreadClock> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_SOFTWARE,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: PERF_COUNT_SW_CPU_CLOCK,
        sample_period: period_ns,
        flags: ATTR_DISABLED | ATTR_EXCLUDE_KERNEL | ATTR_EXCLUDE_HV,
        wakeup_events: 1,
        ..Default::default()
    };
    // SAFETY: `attr` is a #[repr(C)] perf_event_attr whose `size` is its
    // own size.
    let fd = unsafe { crate::perf::open(&attr, tid) }?;
    let clock = ThreadClock::Perf(fd); // closes on the error paths
    let owner = FOwnerEx {
        kind: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: fcntl on our own fd; `owner` is a valid f_owner_ex.
    let ok = unsafe {
        libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx) == 0
            && libc::fcntl(fd, F_SETSIG, libc::SIGPROF) == 0
            && libc::fcntl(fd, libc::F_SETFL, libc::O_ASYNC) == 0
            && libc::ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    Ok(clock)
}

/// Creates a `CLOCK_THREAD_CPUTIME_ID` timer of thread `tid` that signals
/// SIGPROF to that thread every `period_ns` of its CPU time.
pub(crate) fn timer_clock(tid: i32, period_ns: u64) -> std::io::Result<ThreadClock> {
    // MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED): the kernel's encoding of
    // "this thread's CPU clock" (what pthread_getcpuclockid returns).
    let clockid = ((!tid) << 3) | 6;
    // SAFETY: sigevent is plain data; zeroed is valid.
    let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
    sev.sigev_notify = libc::SIGEV_THREAD_ID;
    sev.sigev_signo = libc::SIGPROF;
    sev.sigev_notify_thread_id = tid;
    let mut timer: libc::timer_t = std::ptr::null_mut();
    // SAFETY: valid sigevent and out-pointer.
    if unsafe { libc::timer_create(clockid, &mut sev, &mut timer) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let clock = ThreadClock::Timer(timer);
    let ts = libc::timespec {
        tv_sec: (period_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (period_ns % 1_000_000_000) as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: our timer; valid itimerspec.
    if unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(clock)
}

/// Arms (`Some`) or disarms (`None`) the process-wide `ITIMER_PROF`.
pub(crate) fn itimer(period_ns: Option<u64>) -> std::io::Result<()> {
    let p = period_ns.unwrap_or(0);
    let tv = libc::timeval {
        tv_sec: (p / 1_000_000_000) as libc::time_t,
        tv_usec: ((p % 1_000_000_000) / 1000) as libc::suseconds_t,
    };
    let it = libc::itimerval {
        it_interval: tv,
        it_value: tv,
    };
    // SAFETY: valid itimerval; a null old value.
    if unsafe { libc::setitimer(libc::ITIMER_PROF, &it, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The threads of this process: (thread id, inode of its
/// `/proc/self/task/<tid>` entry). The inode tells a thread from a later one
/// that got the same id (procfs gives a new task a new inode), so a clock
/// is never kept for a dead thread whose id was reused. `None` if the
/// directory cannot be read.
fn list_threads(dir: Option<&std::os::fd::OwnedFd>) -> Option<Vec<(i32, u64)>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::DirEntryExt;
    let Some(dir) = dir else {
        let d = std::fs::read_dir("/proc/self/task").ok()?;
        return Some(
            d.filter_map(|e| {
                let e = e.ok()?;
                Some((e.file_name().to_str()?.parse().ok()?, e.ino()))
            })
            .collect(),
        );
    };
    // A directory fd kept open for the session: listing needs no new fd
    // when the process is at its RLIMIT_NOFILE.
    let fd = dir.as_raw_fd();
    // SAFETY: lseek on our own directory fd.
    if unsafe { libc::lseek(fd, 0, libc::SEEK_SET) } != 0 {
        return None;
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return None;
        }
        if n == 0 {
            return Some(out);
        }
        let n = n as usize;
        let mut off = 0;
        // struct linux_dirent64: u64 d_ino, i64 d_off, u16 d_reclen,
        // u8 d_type, then the NUL-terminated name.
        while off + 19 < n {
            let ino = u64::from_ne_bytes(buf[off..off + 8].try_into().unwrap_or_default());
            let reclen = u16::from_ne_bytes(buf[off + 16..off + 18].try_into().unwrap_or_default());
            if reclen == 0 {
                return None;
            }
            let name = &buf[off + 19..(off + reclen as usize).min(n)];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(tid) = std::str::from_utf8(name).ok().and_then(|t| t.parse().ok()) {
                out.push((tid, ino));
            }
            off += reclen as usize;
        }
    }
}

/// The lowest fd number a perf clock may keep: perf clocks (one fd per
/// thread) leave the host at least an eighth of its `RLIMIT_NOFILE` (at
/// most 64 fds) free; threads beyond that get a thread CPU timer.
fn fd_ceiling() -> i64 {
    // SAFETY: rlimit is plain data; getrlimit writes it.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return i64::MAX;
    }
    let cur = i64::try_from(lim.rlim_cur).unwrap_or(i64::MAX);
    cur.saturating_sub((cur / 8).clamp(1, 64))
}

/// Per-thread clocks of a session, keyed by thread id.
#[derive(Debug, Default)]
pub(crate) struct Clocks {
    /// Per thread id: the inode of its `/proc/self/task` entry (which
    /// thread it is) and its clock.
    pub(crate) by_tid: HashMap<i32, (u64, ThreadClock)>,
    /// Threads whose clock could not be set up (e.g. exited meanwhile).
    pub(crate) failed: u64,
    /// Threads that got another clock than the session's: a thread CPU
    /// timer instead of a perf event or ring because the process was out
    /// of file descriptors (EMFILE/ENFILE, or the reserve of
    /// [`fd_ceiling`] reached), or (perf-ring) a perf event or timer
    /// because the thread's ring could not be opened.
    pub(crate) fallbacks: u64,
    /// `/proc/self/task`, opened once.
    task_dir: Option<std::os::fd::OwnedFd>,
    /// The thread count at the last listing.
    listed_count: Option<u64>,
    /// When the last listing was taken.
    listed_at: Option<std::time::Instant>,
    /// Threads whose event had hung up and which the last listing still
    /// showed (see [`Clocks::sync`]).
    hup_known: std::collections::HashSet<i32>,
    /// Data pages per ring ([`Clock::PerfRing`]).
    pub(crate) ring_pages: usize,
    /// The data pages of the smallest ring opened (one halved for the perf
    /// mlock budget: [`crate::ring::open_within_budget`]).
    ring_pages_min: Option<usize>,
    /// Bytes of user stack per ring sample.
    pub(crate) ring_stack: u32,
    /// Unwinds the rings' samples ([`Clock::PerfRing`]).
    pub(crate) ring: crate::ring::Drainer,
    /// A thread given no clock: the session's helper.
    skip: Option<i32>,
    /// Perf rings only, no signal clock as a thread's fallback (the host
    /// owns SIGPROF): a thread whose ring cannot be opened is not sampled
    /// (counted in `failed`).
    pub(crate) ring_only: bool,
    /// Rings of threads that exited, kept until the next
    /// [`drain_rings`](Self::drain_rings) has read their last samples.
    retired: Vec<ThreadClock>,
}

impl Clocks {
    /// No clocks yet; keeps `/proc/self/task` open for the listings.
    pub(crate) fn new() -> Clocks {
        use std::os::fd::FromRawFd;
        // SAFETY: open with a NUL-terminated path; a valid fd is owned by
        // the OwnedFd alone.
        let fd = unsafe {
            libc::open(
                c"/proc/self/task".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        Clocks {
            // SAFETY: `fd` is a fresh fd we own.
            task_dir: (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }),
            ..Clocks::default()
        }
    }

    /// The process's thread count, from the link count of the open
    /// `/proc/self/task` (procfs reports threads + 2): one `fstat`, where a
    /// listing costs the kernel a dentry per thread.
    fn thread_count(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let fd = self.task_dir.as_ref()?.as_raw_fd();
        // SAFETY: stat is plain data; fstat fills it from our own fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is our open directory; `st` a valid out-pointer.
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_nlink)
    }

    /// Gives every thread not yet known its clock and forgets threads that
    /// are gone. Returns how many were added.
    ///
    /// The thread list is read only when the thread count changed since the
    /// last listing, when a thread with a perf ring has exited since
    /// ([`hung_up_tids`](Self::hung_up_tids), not counting those a listing
    /// already showed still there), or
    /// [`FULL_SCAN_INTERVAL`] after the last listing
    /// ([`FULL_SCAN_INTERVAL_POLLED`] when every clock is a perf ring).
    /// A thread that exited and one that started between two calls leave
    /// the count as it was: the exit is seen by the poll when the thread
    /// had a ring, else at the next full listing.
    pub(crate) fn sync(&mut self, clock: Clock, period_ns: u64) -> usize {
        if clock == Clock::ItimerProf {
            return 0;
        }
        let count = self.thread_count();
        let every = if !self.by_tid.is_empty()
            && self
                .by_tid
                .values()
                .all(|(_, c)| matches!(c, ThreadClock::Ring(_)))
        {
            FULL_SCAN_INTERVAL_POLLED
        } else {
            FULL_SCAN_INTERVAL
        };
        let quiet = count.is_some()
            && count == self.listed_count
            && self.listed_at.is_some_and(|t| t.elapsed() < every);
        // Polled at every wake (one `poll`, no wait), so that the set of
        // known hang-ups survives listings the poll did not cause.
        let hup = self.hung_up_tids();
        if quiet
            && hup
                .as_ref()
                .is_some_and(|h| h.iter().all(|t| self.hup_known.contains(t)))
        {
            return 0;
        }
        self.listed_at = Some(std::time::Instant::now());
        let added = match list_threads(self.task_dir.as_ref()) {
            Some(now) => self.sync_with(&now, clock, period_ns),
            None => 0,
        };
        // The count read before the listing stands for it only if it still
        // holds after: a thread that exited during the listing would leave
        // a stale count that a later start restores, hiding that start
        // until the full listing. Otherwise the next wake lists again.
        self.listed_count = if self.thread_count() == count {
            count
        } else {
            None
        };
        // The process's main thread, once it called `pthread_exit`, stays
        // listed (a zombie) until the process exits, its event hung up:
        // that HUP is not news at the next wakes, which would otherwise
        // list every time. Only the main thread: any other thread with a
        // HUP is about to leave the list (its exit is under way), and
        // remembering it would hide a start that restores the count.
        // SAFETY: getpid has no preconditions.
        let main = unsafe { libc::getpid() };
        self.hup_known = hup
            .unwrap_or_default()
            .into_iter()
            .filter(|&t| t == main && self.by_tid.contains_key(&t))
            .collect();
        added
    }

    /// How often the helper must drain the rings ([`Clock::PerfRing`]):
    /// [`crate::ring::drain_interval`] of the smallest ring opened (a ring
    /// halved for the mlock budget fills twice as fast), at most
    /// [`crate::ring::ring_interval`].
    pub(crate) fn ring_drain_interval(&self, period_ns: u64) -> Duration {
        crate::ring::drain_interval(
            period_ns,
            self.ring_pages_min.unwrap_or(self.ring_pages),
            self.ring_stack,
            crate::ring::ring_interval(period_ns),
        )
    }

    /// The threads with a perf ring that
    /// have exited: the kernel reports `POLLHUP` on a per-thread event
    /// whose thread is gone (`perf_poll`: the event's state is `EXIT`). One
    /// `poll` over the clocks' fds, no wait; `POLLERR`/`POLLNVAL` count too
    /// (the listing then sorts it out); `None` when `poll` fails. Thread
    /// CPU timers have no fd.
    fn hung_up_tids(&self) -> Option<Vec<i32>> {
        let mut fds = Vec::with_capacity(self.by_tid.len());
        let mut tids = Vec::with_capacity(self.by_tid.len());
        for (&tid, (_, c)) in &self.by_tid {
            // Only ring events: `perf_poll` reports POLLHUP on an event
            // with no ring buffer whatever its thread does (it starts from
            // EPOLLHUP and replaces it only from the ring's state), so a
            // signalled perf clock's fd says nothing about its thread.
            let fd = match c {
                ThreadClock::Ring(r) => r.fd(),
                ThreadClock::Perf(_) | ThreadClock::Timer(_) => continue,
            };
            // No event asked for: only POLLHUP/POLLERR/POLLNVAL, which are
            // always reported, come back (not the ring's POLLIN).
            fds.push(libc::pollfd {
                fd,
                events: 0,
                revents: 0,
            });
            tids.push(tid);
        }
        if fds.is_empty() {
            return Some(Vec::new());
        }
        // SAFETY: `fds` is a valid array of `len` pollfds; the fds are our
        // clocks' own, open while `self` holds them; timeout 0: no wait.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n < 0 {
            return None;
        }
        Some(
            fds.iter()
                .zip(tids)
                .filter(|(p, _)| p.revents != 0)
                .map(|(_, t)| t)
                .collect(),
        )
    }

    /// Gives thread `tid` no clock (dropping the one it has).
    pub(crate) fn skip_tid(&mut self, tid: i32) {
        self.skip = Some(tid);
        self.by_tid.remove(&tid);
    }

    /// [`Clocks::sync`] against the listing `now` of (tid, inode).
    pub(crate) fn sync_with(&mut self, now: &[(i32, u64)], clock: Clock, period_ns: u64) -> usize {
        let live: std::collections::HashSet<(i32, u64)> = now.iter().copied().collect();
        // A clock whose thread is gone goes, also when a new thread got the
        // same id (another inode): the new one gets its own clock below.
        // A gone thread's ring still holds the samples taken since the
        // last drain: it is retired, drained by the next drain_rings, and
        // only then unmapped.
        let gone: Vec<i32> = self
            .by_tid
            .iter()
            .filter(|(tid, (ino, _))| !live.contains(&(**tid, *ino)))
            .map(|(tid, _)| *tid)
            .collect();
        for tid in gone {
            if let Some((_, c)) = self.by_tid.remove(&tid)
                && matches!(c, ThreadClock::Ring(_))
            {
                self.retired.push(c);
            }
        }
        let ceiling = fd_ceiling();
        let mut added = 0;
        // Ring pages locked by this session: past the soft cap, new rings
        // are opened at half size (ring::SOFT_CAP_PAGES).
        let mut locked: usize = self
            .by_tid
            .values()
            .map(|(_, c)| c)
            .chain(self.retired.iter())
            .filter_map(|c| match c {
                ThreadClock::Ring(r) => Some(r.pages()),
                _ => None,
            })
            .sum();
        for &(tid, ino) in now {
            if self.by_tid.contains_key(&tid) || self.skip == Some(tid) {
                continue;
            }
            let c = match clock {
                Clock::PerfRing => {
                    let pages = if locked + self.ring_pages > crate::ring::SOFT_CAP_PAGES {
                        crate::ring::half_pages(self.ring_pages, self.ring_stack)
                            .unwrap_or(self.ring_pages)
                    } else {
                        self.ring_pages
                    };
                    match crate::ring::open_within_budget(tid, period_ns, pages, self.ring_stack) {
                        Ok(r) if i64::from(r.fd()) >= ceiling && self.ring_only => {
                            drop(r);
                            Err(std::io::Error::from_raw_os_error(libc::EMFILE))
                        }
                        Err(e) if self.ring_only => Err(e),
                        Ok(r) if i64::from(r.fd()) >= ceiling => {
                            drop(r);
                            let t = timer_clock(tid, period_ns);
                            if t.is_ok() {
                                self.fallbacks += 1;
                            }
                            t
                        }
                        Ok(r) => {
                            self.ring.note_thread(tid);
                            let p = r.pages();
                            locked += p;
                            self.ring_pages_min = Some(self.ring_pages_min.map_or(p, |m| m.min(p)));
                            Ok(ThreadClock::Ring(r))
                        }
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                            let t = timer_clock(tid, period_ns);
                            if t.is_ok() {
                                self.fallbacks += 1;
                            }
                            t
                        }
                        // No ring (e.g. EPERM: over the perf mlock budget): the
                        // thread is sampled by signal.
                        Err(_) => {
                            let t =
                                perf_clock(tid, period_ns).or_else(|_| timer_clock(tid, period_ns));
                            if t.is_ok() {
                                self.fallbacks += 1;
                            }
                            t
                        }
                    }
                }
                Clock::PerfEvent => match perf_clock(tid, period_ns) {
                    // fds are handed out lowest first: an fd at the ceiling
                    // means fewer than FD_RESERVE are left for the host.
                    Ok(ThreadClock::Perf(fd)) if i64::from(fd) >= ceiling => {
                        let t = timer_clock(tid, period_ns);
                        if t.is_ok() {
                            self.fallbacks += 1;
                        }
                        t
                    }
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                        // Out of fds: this thread gets a thread CPU timer
                        // (no fd needed).
                        let t = timer_clock(tid, period_ns);
                        if t.is_ok() {
                            self.fallbacks += 1;
                        }
                        t
                    }
                    other => other,
                },
                _ => timer_clock(tid, period_ns),
            };
            match c {
                Ok(c) => {
                    self.by_tid.insert(tid, (ino, c));
                    added += 1;
                }
                Err(_) => self.failed += 1,
            }
        }
        added
    }

    /// Drains every thread's ring ([`Clock::PerfRing`]) and unwinds the
    /// samples into `each`.
    pub(crate) fn drain_rings(&mut self, period_ns: u64, each: impl FnMut(Drained)) {
        // No ring (every clock but PerfRing): nothing to drain, and no module
        // list for the unwinder to build.
        if self.retired.is_empty()
            && !self
                .by_tid
                .values()
                .any(|(_, c)| matches!(c, ThreadClock::Ring(_)))
        {
            return;
        }
        let rings = self
            .by_tid
            .values_mut()
            .filter_map(|(_, c)| match c {
                ThreadClock::Ring(r) => Some(r),
                _ => None,
            })
            .chain(self.retired.iter_mut().filter_map(|c| match c {
                ThreadClock::Ring(r) => Some(r),
                _ => None,
            }));
        self.ring.drain(rings, period_ns, each);
        // Read to the end: the retired rings are unmapped now.
        self.retired.clear();
    }

    /// Stops every clock: signal clocks are dropped, rings disabled (their
    /// records stay for a last [`drain_rings`](Self::drain_rings)).
    pub(crate) fn stop_all(&mut self) {
        self.by_tid.retain(|_, (_, c)| {
            if let ThreadClock::Ring(r) = c {
                r.disable();
                true
            } else {
                false
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    use hotpatch_sys::raw::gettid;

    /// A handler that passed the ACTIVE check of one session and finishes
    /// after the next one started: its sample is not the new session's.
    /// (No other unit test of this crate records samples.)
    #[test]
    fn a_late_sample_of_an_earlier_session_is_discarded() {
        activate(Clock::ItimerProf, 1_000_000);
        let buf = buffer_if_any().unwrap();
        let earlier = SESSION.load(Ordering::Acquire);
        let (_, _, late_before) = copy_counts();
        // Two handlers of the session: one done, one still writing.
        for i in 0..2 {
            STATES[i]
                .compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed)
                .unwrap();
            // SAFETY: the slot is ours (moved from FREE to WRITING above).
            let d = unsafe { &mut *buf[i].data.get() };
            d.session = earlier;
            d.rip = 0x1000;
            d.len = 0;
        }
        STATES[0].store(READY, Ordering::Release);
        // The session's last drain ran; the next session starts.
        deactivate();
        activate(Clock::ItimerProf, 1_000_000);
        // The handler still writing finishes now.
        STATES[1].store(READY, Ordering::Release);
        let mut drained = 0;
        drain(|_| vec![1], |_| drained += 1);
        deactivate();
        assert_eq!(drained, 0, "a sample of the earlier session was drained");
        assert_eq!(copy_counts().2 - late_before, 2);
        assert_eq!(STATES[0].load(Ordering::Acquire), FREE);
        assert_eq!(STATES[1].load(Ordering::Acquire), FREE);
    }
    use hotpatch_sys::signal::{MaskGuard, sigset_of};

    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn sigprof_set() -> libc::sigset_t {
        sigset_of(&[libc::SIGPROF])
    }

    /// Syncs `clocks` until thread `tid` has a clock (`want`) or has none
    /// (bounded far above the listing's FULL_SCAN_INTERVAL: another test's
    /// thread exiting as ours starts leaves the count unchanged).
    fn sync_until(clocks: &mut Clocks, clock: Clock, period_ns: u64, tid: i32, want: bool) {
        let t0 = std::time::Instant::now();
        clocks.sync(clock, period_ns);
        while clocks.by_tid.contains_key(&tid) != want {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "never synced ({want})"
            );
            std::thread::sleep(Duration::from_millis(1));
            clocks.sync(clock, period_ns);
        }
    }

    /// Waits until a joined thread left `/proc` (its tid is cleared before
    /// the kernel releases the task).
    fn wait_gone_from_proc(tid: i32) {
        let t0 = std::time::Instant::now();
        while list_threads(None).unwrap().iter().any(|(t, _)| *t == tid) {
            assert!(t0.elapsed() < Duration::from_secs(30), "never left /proc");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The thread-count check in front of the listing does not hide threads:
    /// a thread started after a sync gets a clock from a later sync, and
    /// once it has exited its clock is dropped. (The timers' period is
    /// 1000 s of CPU: they never fire here.)
    #[test]
    fn threads_started_or_gone_between_syncs_are_seen_by_later_syncs() {
        const NEVER: u64 = 1_000 * 1_000_000_000;
        let mut clocks = Clocks::new();
        assert!(clocks.thread_count().is_some_and(|n| n >= 3), "threads + 2");
        clocks.sync(Clock::ThreadTimer, NEVER);
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (tid_tx, tid_rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            let _ = go_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        // Other tests' threads come and go meanwhile: should one exit as
        // ours starts, the count is unchanged and the listing comes
        // FULL_SCAN_INTERVAL later, hence the loop (bounded far above it).
        sync_until(&mut clocks, Clock::ThreadTimer, NEVER, tid, true);
        drop(go_tx);
        t.join().unwrap();
        wait_gone_from_proc(tid);
        sync_until(&mut clocks, Clock::ThreadTimer, NEVER, tid, false);
    }

    /// The samples a thread's ring took between the last drain and the
    /// sync that finds the thread gone are drained, not unmapped with the
    /// ring: a thread that burns 100 ms of its CPU and exits before any
    /// drain still has its samples.
    #[test]
    fn a_gone_threads_last_samples_are_drained() {
        const PERIOD: u64 = 1_000_000;
        let mut clocks = Clocks::new();
        clocks.ring_stack = crate::ring::STACK_BYTES;
        clocks.ring_pages = crate::ring::data_pages(
            PERIOD,
            crate::ring::ring_interval(PERIOD),
            clocks.ring_stack,
        );
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (tid_tx, tid_rx) = mpsc::channel();
        let t = std::thread::Builder::new()
            .name("gone-ring".into())
            .spawn(move || {
                tid_tx.send(gettid()).unwrap();
                let _ = go_rx.recv();
                let end = thread_cpu() + Duration::from_millis(100);
                let mut x = 0u64;
                while thread_cpu() < end {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
            .unwrap();
        let tid = tid_rx.recv().unwrap();
        sync_until(&mut clocks, Clock::PerfRing, PERIOD, tid, true);
        assert!(
            matches!(clocks.by_tid[&tid].1, ThreadClock::Ring(_)),
            "the thread got no ring (perf_event_open refused?)"
        );
        drop(go_tx);
        t.join().unwrap();
        wait_gone_from_proc(tid);
        sync_until(&mut clocks, Clock::PerfRing, PERIOD, tid, false);
        let mut theirs = 0;
        clocks.drain_rings(PERIOD, |d| {
            if d.name == "gone-ring" {
                theirs += 1;
            }
        });
        assert!(
            theirs > 0,
            "the gone thread's samples were dropped with its ring"
        );
        assert!(clocks.retired.is_empty());
    }

    /// Whether `fd` reports `POLLHUP` now.
    fn hung_up(fd: libc::c_int) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd; no wait.
        unsafe { libc::poll(&mut p, 1, 0) };
        p.revents & libc::POLLHUP != 0
    }

    /// A thread with a ring that exits as another starts leaves the thread
    /// count as it was; its event's `POLLHUP` makes the next sync list the
    /// threads, so the new thread gets its ring at that sync, not at the
    /// next full listing ([`FULL_SCAN_INTERVAL_POLLED`], 1 s). (The period
    /// is 1000 s of CPU: the rings never sample.)
    #[test]
    fn an_exit_seen_by_poll_lists_a_thread_started_meanwhile() {
        const NEVER: u64 = 1_000 * 1_000_000_000;
        let mut clocks = Clocks::new();
        clocks.ring_stack = crate::ring::STACK_BYTES;
        clocks.ring_pages = 8;
        let spawn = |name: &str| {
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let (tid_tx, tid_rx) = mpsc::channel();
            let h = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    tid_tx.send(gettid()).unwrap();
                    let _ = go_rx.recv();
                })
                .unwrap();
            (h, tid_rx.recv().unwrap(), go_tx)
        };
        let (a, a_tid, a_go) = spawn("poll-a");
        sync_until(&mut clocks, Clock::PerfRing, NEVER, a_tid, true);
        let ThreadClock::Ring(r) = &clocks.by_tid[&a_tid].1 else {
            panic!("the thread got no ring (perf_event_open refused?)");
        };
        let a_fd = r.fd();
        assert!(!hung_up(a_fd), "POLLHUP while the thread lives");
        drop(a_go);
        a.join().unwrap();
        wait_gone_from_proc(a_tid);
        assert!(hung_up(a_fd), "no POLLHUP once the thread is gone");
        assert!(clocks.hung_up_tids().unwrap().contains(&a_tid));
        let (b, b_tid, b_go) = spawn("poll-b");
        // The last listing is recent and the count may well be the same
        // (one thread gone, one new): only the poll makes this sync list.
        clocks.sync(Clock::PerfRing, NEVER);
        assert!(
            clocks.by_tid.contains_key(&b_tid),
            "the thread started as a clocked one exited waits for a full listing"
        );
        assert!(!clocks.by_tid.contains_key(&a_tid));
        drop(b_go);
        b.join().unwrap();
    }

    /// Past `ring::SOFT_CAP_PAGES` of ring pages in a session, new rings
    /// are opened at half size: 40 threads with 1 MiB (256-page) rings ask
    /// for 40 MiB; at most 32 get the full size (fewer when the perf mlock
    /// budget halves some first), the rest get 128 pages.
    #[test]
    fn rings_past_the_soft_cap_are_opened_at_half_size() {
        const NEVER: u64 = 1_000 * 1_000_000_000;
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = std::sync::Arc::new(std::sync::Mutex::new(go_rx));
        let (tid_tx, tid_rx) = mpsc::channel();
        let threads: Vec<_> = (0..40)
            .map(|_| {
                let (tid_tx, go_rx) = (tid_tx.clone(), go_rx.clone());
                std::thread::spawn(move || {
                    tid_tx.send(gettid()).unwrap();
                    let _ = go_rx.lock().unwrap().recv();
                })
            })
            .collect();
        let tids: Vec<i32> = (0..40).map(|_| tid_rx.recv().unwrap()).collect();
        let mut clocks = Clocks::new();
        clocks.ring_stack = crate::ring::STACK_BYTES;
        clocks.ring_pages = 256;
        let now: Vec<(i32, u64)> = list_threads(None)
            .unwrap()
            .into_iter()
            .filter(|(t, _)| tids.contains(t))
            .collect();
        assert_eq!(now.len(), 40);
        clocks.sync_with(&now, Clock::PerfRing, NEVER);
        let pages: Vec<usize> = clocks
            .by_tid
            .values()
            .filter_map(|(_, c)| match c {
                ThreadClock::Ring(r) => Some(r.pages()),
                _ => None,
            })
            .collect();
        let full = pages.iter().filter(|&&p| p == 256).count();
        println!("ring sizes: {full} of 256 pages, {} in all", pages.len());
        assert!(
            !pages.is_empty(),
            "no ring opened (perf_event_open refused?)"
        );
        assert!(
            full * 256 <= crate::ring::SOFT_CAP_PAGES,
            "{full} full-size rings: over the soft cap"
        );
        assert!(
            pages.iter().all(|&p| p == 256 || p == 128),
            "sizes {pages:?}"
        );
        drop(clocks);
        drop(go_tx);
        for t in threads {
            t.join().unwrap();
        }
    }

    /// A signalled perf clock (no ring) reports `POLLHUP` while its thread
    /// lives (`perf_poll` starts from EPOLLHUP and only a ring's state
    /// replaces it), so such fds are not polled for exits: a live thread
    /// with one is never taken for gone, and a session of them lists at
    /// the 100 ms interval, not the polled one.
    #[test]
    fn a_signalled_perf_clock_is_not_polled_for_exits() {
        const NEVER: u64 = 1_000 * 1_000_000_000;
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (tid_tx, tid_rx) = mpsc::channel();
        let a = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            let _ = go_rx.recv();
        });
        let a_tid = tid_rx.recv().unwrap();
        let mut clocks = Clocks::new();
        sync_until(&mut clocks, Clock::PerfEvent, NEVER, a_tid, true);
        let ThreadClock::Perf(fd) = clocks.by_tid[&a_tid].1 else {
            panic!("the thread got no perf clock (perf_event_open refused?)");
        };
        println!(
            "POLLHUP on a live thread's ringless perf event: {}",
            hung_up(fd)
        );
        assert!(
            !clocks.hung_up_tids().unwrap().contains(&a_tid),
            "a live thread with a signalled perf clock was reported gone"
        );
        drop(go_tx);
        a.join().unwrap();
    }

    /// A thread that exits and a new thread that gets its id (here: threads
    /// are spawned until the kernel's pid allocator wraps back to it) is a
    /// new thread: the dead one's clock is dropped and the new one gets its
    /// own, which signals it. Verdict: a SIGPROF is pending after the new
    /// thread spent 200 ms of its own CPU time with SIGPROF blocked.
    #[test]
    fn a_new_thread_with_a_dead_threads_id_gets_its_own_clock() {
        // Blocks SIGPROF on this thread; spawned threads inherit it.
        let mask = MaskGuard::block_raw(sigprof_set()).unwrap();
        let (tid_tx, tid_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let a = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            let _ = go_rx.recv();
        });
        let a_tid = tid_rx.recv().unwrap();
        let a_entry = *list_threads(None)
            .unwrap()
            .iter()
            .find(|(t, _)| *t == a_tid)
            .unwrap();
        let mut clocks = Clocks::new();
        assert_eq!(clocks.sync_with(&[a_entry], Clock::PerfEvent, 1_000_000), 1);
        drop(go_tx);
        a.join().unwrap();

        let pid_max: usize = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(go_rx));
        let mut b = None;
        for _ in 0..2 * pid_max {
            let (m_tx, m_rx) = mpsc::sync_channel(1);
            let go_rx = Arc::clone(&go_rx);
            let h = std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    if gettid() != a_tid {
                        m_tx.send(false).unwrap();
                        return false;
                    }
                    m_tx.send(true).unwrap();
                    let _ = go_rx.lock().unwrap().recv();
                    let end = thread_cpu() + Duration::from_millis(200);
                    let mut x = 0u64;
                    while thread_cpu() < end {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                    let zero = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    };
                    // SAFETY: valid set and timeout.
                    let sig =
                        unsafe { libc::sigtimedwait(&sigprof_set(), std::ptr::null_mut(), &zero) };
                    sig == libc::SIGPROF
                })
                .unwrap();
            if m_rx.recv().unwrap() {
                b = Some(h);
                break;
            }
            h.join().unwrap();
        }
        let b = b.expect("the thread id never came back within 2 * pid_max threads");
        let b_entry = *list_threads(None)
            .unwrap()
            .iter()
            .find(|(t, _)| *t == a_tid)
            .unwrap();
        assert_ne!(
            a_entry.1, b_entry.1,
            "procfs gave the new thread the old inode"
        );
        clocks.sync_with(&[b_entry], Clock::PerfEvent, 1_000_000);
        drop(go_tx);
        let signalled = b.join().unwrap();
        drop(clocks);
        // Restores this thread's mask.
        drop(mask);
        assert!(
            signalled,
            "the new thread with id {a_tid} got no SIGPROF: the dead thread's clock was kept"
        );
    }
}
