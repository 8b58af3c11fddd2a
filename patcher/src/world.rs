//! Stop-the-world: park every other thread of the process in a signal
//! handler, learn where each was interrupted, optionally move it, release.
//!
//! A thread whose mask blocks the stop signal (read from
//! `/proc/self/task/<tid>/status` before anything is sent) is stopped with
//! ptrace instead: a helper process that shares our memory but is not in our
//! thread group (`hotpatch_sys::helper`) seizes and interrupts it, reads its
//! registers into the same table, and after the release writes the new RIP
//! (if the fix-up moved it) and detaches it. See SAFETY.md, P2 "ptrace".
//!
//! Between [`stop`] and [`Stopped::release`], the calling thread may not
//! allocate, log, or take any lock another thread could hold (a parked thread
//! may own malloc's arena lock, stdio's, or the loader lock). Everything here
//! therefore uses static tables, raw syscalls (`getdents64`, `tgkill`,
//! `futex`) and plain atomics. The signal handler is async-signal-safe: no
//! locks, no allocation, no lazy thread-locals, `errno` preserved.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hotpatch_symbolizer::RuntimeAddr;
use hotpatch_sys::helper::{self, Helper, HelperStack};
use hotpatch_sys::signal::MaskGuard;
use hotpatch_sys::{mem, ptrace, raw, status};

use crate::counters as stats;
use crate::error::{Error, Result};

/// Most threads a stop can track. Beyond it, install refuses rather than
/// patching with threads it could not account for.
pub const MAX_THREADS: usize = 4096;

const EMPTY: u32 = 0;
const SENT: u32 = 1;
const STOPPED: u32 = 2;
const GAVE_UP: u32 = 3;
const RESUMED: u32 = 4;
/// Blocks the stop signal: to be stopped by the ptrace helper.
const PT_WANT: u32 = 5;
/// The helper could not seize it (`pt_err` says why).
const PT_FAILED: u32 = 6;

/// One thread's slot. `word` packs `tid << 32 | state` so that a handler
/// can only claim the slot of *its own* tid in state `SENT` with a single
/// compare-and-swap: a late signal from an earlier stop can never park a
/// thread in a slot the coordinator is reassigning to another thread.
struct Entry {
    word: AtomicU64,
    rip: AtomicU64,
    new_rip: AtomicU64,
    /// `SigBlk` when the thread was listed.
    mask: AtomicU64,
    /// `TracerPid` when the thread was listed.
    tracer: AtomicI32,
    /// The helper seized it (it is a tracee until the helper detaches or exits).
    seized: AtomicBool,
    /// `errno` of a failed `PTRACE_SEIZE`.
    pt_err: AtomicI32,
    /// Signal to re-inject at detach (a signal-delivery-stop), or 0.
    pt_sig: AtomicI32,
    /// 2 when the ptrace stop interrupted a restartable system call (the
    /// kernel rewinds RIP by 2 on resume; `rip` holds the rewound address),
    /// else 0.
    pt_restart: AtomicU64,
    /// The stack pointer at the stop (interrupted context), for the scan of
    /// signal frames below it ([`scan_signal_frames`]).
    rsp: AtomicU64,
    /// `tgkill` could not queue the stop signal (EAGAIN: RLIMIT_SIGPENDING):
    /// the probe hands the thread to ptrace whatever its mask.
    unsent: AtomicBool,
}

fn pack(tid: i32, state: u32) -> u64 {
    (u64::from(tid as u32) << 32) | u64::from(state)
}

impl Entry {
    fn tid(&self) -> i32 {
        (self.word.load(Ordering::Acquire) >> 32) as u32 as i32
    }
    fn state(&self) -> u32 {
        self.word.load(Ordering::Acquire) as u32
    }
    /// Moves the slot from `from` to `to` if it still belongs to `tid` in `from`.
    fn transition(&self, tid: i32, from: u32, to: u32) -> bool {
        self.word
            .compare_exchange(
                pack(tid, from),
                pack(tid, to),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

#[allow(
    clippy::declare_interior_mutable_const,
    reason = "used only as an array initializer"
)]
const ENTRY: Entry = Entry {
    word: AtomicU64::new(0),
    rip: AtomicU64::new(0),
    new_rip: AtomicU64::new(0),
    mask: AtomicU64::new(0),
    tracer: AtomicI32::new(0),
    seized: AtomicBool::new(false),
    pt_err: AtomicI32::new(0),
    pt_sig: AtomicI32::new(0),
    pt_restart: AtomicU64::new(0),
    unsent: AtomicBool::new(false),
    rsp: AtomicU64::new(0),
};

static TABLE: [Entry; MAX_THREADS] = [ENTRY; MAX_THREADS];
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Futex word: 0 while threads must stay parked, 1 once released.
static RELEASE: AtomicU32 = AtomicU32::new(1);
/// Futex word: how many threads have parked.
static PARKED: AtomicU32 = AtomicU32::new(0);
/// Futex word: how many parked threads have left the handler.
static LEFT: AtomicU32 = AtomicU32::new(0);
/// The signal in use (0 until installed).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static REQUESTED_SIGNAL: AtomicI32 = AtomicI32::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Whether threads blocking the stop signal go to ptrace (default) or, as
/// before, get the signal and become stragglers after the timeout.
static PTRACE_ENABLED: AtomicBool = AtomicBool::new(true);
/// Futex word: batches of `PT_WANT` threads requested from the helper
/// (bumped by the coordinator; also bumped at release to wake it).
static PT_REQ: AtomicU32 = AtomicU32::new(0);
/// Batches the helper has finished.
static PT_DONE: AtomicU32 = AtomicU32::new(0);
/// Futex word: 1 once the helper may start tracing (after `PR_SET_PTRACER`).
static PT_GO: AtomicU32 = AtomicU32::new(0);
/// `CLOCK_MONOTONIC` ns by which the helper stops waiting for tracees.
static PT_DEADLINE: AtomicU64 = AtomicU64::new(0);
/// The helper's stack: mapped once, reused by every stop (one at a time).
static HELPER_STACK: HelperStack = HelperStack::new();

/// Turns the ptrace path on or off (on by default). Off, a thread that
/// blocks the stop signal is signalled anyway and, not parking, becomes a
/// straggler after the timeout (the pre-ptrace behaviour: the int3 protocol
/// or `E_PATCH_THREAD_UNSTOPPABLE`). For hosts that must never be traced, and for
/// tests of the int3 protocol.
pub fn set_ptrace_enabled(on: bool) {
    PTRACE_ENABLED.store(on, Ordering::Release);
}

/// Whether the ptrace path is on.
pub fn ptrace_enabled() -> bool {
    PTRACE_ENABLED.load(Ordering::Acquire)
}

/// Chooses the real-time signal used to stop threads (default `SIGRTMIN+7`).
/// Must be called before the first patch; later calls are refused.
///
/// # Errors
/// `E_PATCH_OS` (EINVAL) when `sig` is not a real-time signal, or (EBUSY) when the
/// handler is already installed with another signal.
pub fn set_stop_signal(sig: i32) -> Result<()> {
    if !(libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) {
        return Err(Error::Os {
            what: "set_stop_signal",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    if INSTALLED.load(Ordering::Acquire) && SIGNAL.load(Ordering::Acquire) != sig {
        return Err(Error::Os {
            what: "set_stop_signal (already installed)",
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        });
    }
    REQUESTED_SIGNAL.store(sig, Ordering::Release);
    Ok(())
}

/// The stop signal in use, once installed.
pub fn stop_signal() -> Option<i32> {
    let s = SIGNAL.load(Ordering::Acquire);
    (s != 0).then_some(s)
}

/// Installs the stop handler once. Call with the patcher lock held.
fn install_handler() -> Result<()> {
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut sig = REQUESTED_SIGNAL.load(Ordering::Acquire);
    if sig == 0 {
        sig = libc::SIGRTMIN() + 7;
    }
    // A real-time signal: `hotpatch_sys::signal` takes it by number (nix's
    // `Signal` cannot name it).
    // SAFETY: a zeroed sigaction is a valid starting point; we fill the
    // handler, flags and mask below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
    // A parked thread runs no other asynchronous handler until released.
    sa.sa_mask = async_signals();
    // SAFETY: `handler` is async-signal-safe (see its body), has the
    // SA_SIGINFO signature, and is a `fn` item, valid forever.
    unsafe { hotpatch_sys::signal::swap_action(sig, &sa) }.map_err(|source| Error::Os {
        what: "sigaction(stop signal)",
        source,
    })?;
    // The kernel stored glibc's `__restore_rt` as our `sa_restorer`: the
    // return address of every signal frame glibc's `sigaction` sets up.
    if let Ok(cur) = hotpatch_sys::signal::query_action(sig) {
        if cur.sa_flags & SA_RESTORER != 0 {
            RESTORER.store(cur.sa_restorer.map_or(0, |r| r as usize), Ordering::Release);
        }
    }
    SIGNAL.store(sig, Ordering::Release);
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// `SA_RESTORER` (asm/signal.h, x86-64).
const SA_RESTORER: i32 = 0x0400_0000;
/// glibc's `__restore_rt` (0 if unknown).
static RESTORER: AtomicUsize = AtomicUsize::new(0);
/// How far above a stopped thread's stack pointer signal frames are sought.
const FRAME_SCAN: usize = 64 * 1024;

/// Looks for signal frames (a word equal to `__restore_rt`: the handler's
/// return address, followed by the `ucontext_t`) in the `FRAME_SCAN` bytes
/// above `rsp` (stopping at an unreadable page), and passes each frame's
/// saved RIP through `f`; a moved RIP is written back into the frame, so
/// that `rt_sigreturn` resumes at the equivalent address. With every
/// thread stopped; no allocation (a 4 KiB stack buffer).
fn scan_signal_frames(rsp: u64, f: &mut impl FnMut(usize) -> usize) {
    let restorer = RESTORER.load(Ordering::Acquire);
    if restorer == 0 || rsp == 0 {
        return;
    }
    // rt_sigframe: pretcode, then the ucontext_t.
    let rip_off =
        8 + std::mem::offset_of!(libc::ucontext_t, uc_mcontext) + libc::REG_RIP as usize * 8;
    let mut buf = [0u8; 4096];
    let start = (rsp as usize) & !7;
    let mut at = start;
    while at < start + FRAME_SCAN {
        let len = (4096 - (at & 4095)).min(buf.len());
        if !mem::read_self(at, &mut buf[..len]) {
            return;
        }
        for (i, w) in buf[..len].chunks_exact(8).enumerate() {
            if usize::from_ne_bytes(w.try_into().unwrap_or([0; 8])) != restorer {
                continue;
            }
            let slot = at + i * 8 + rip_off;
            let mut saved = [0u8; 8];
            if !mem::read_self(slot, &mut saved) {
                continue;
            }
            let rip = usize::from_ne_bytes(saved);
            let to = f(rip);
            if to != rip {
                stats::bump(&stats::FRAME_FIXUPS);
                // SAFETY: `slot` is in a stopped thread's signal frame on
                // its stack, which no Rust reference of ours aliases.
                unsafe { mem::write_self(slot, &to.to_ne_bytes()) };
            }
        }
        at += len;
    }
}

fn gettid() -> i32 {
    raw::gettid()
}

/// `FUTEX_WAIT_PRIVATE` through `sys::raw` (no `errno`: also called from
/// the stop handler).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    // `raw::futex_wait` reads 0 as "no timeout": a zero timeout waits 1 ns.
    let ns = timeout.map_or(0, |d| {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
    });
    raw::futex_wait(word, expected, ns);
}

fn futex_wake(word: &AtomicU32, n: i32) {
    raw::futex_wake(word, n);
}

/// The stop handler. Async-signal-safe: atomics, `gettid`, `futex` only.
extern "C" fn handler(_sig: i32, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for
    // the thread's lifetime.
    let errno = unsafe { *libc::__errno_location() };
    let tid = gettid();
    let n = COUNT.load(Ordering::Acquire).min(MAX_THREADS);
    let Some(e) = TABLE[..n]
        .iter()
        .find(|e| e.word.load(Ordering::Acquire) == pack(tid, SENT))
    else {
        // A late signal from an earlier stop: nothing to do.
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
        return;
    };
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: with SA_SIGINFO the kernel passes a valid ucontext_t for the
    // interrupted context as the third argument; it lives on this thread's
    // (signal) stack until the handler returns.
    let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as u64;
    // SAFETY: as above.
    let rsp = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RSP as usize] } as u64;
    e.rsp.store(rsp, Ordering::Relaxed);
    e.rip.store(rip, Ordering::Relaxed);
    e.new_rip.store(rip, Ordering::Relaxed);
    if !e.transition(tid, SENT, STOPPED) {
        // The coordinator gave up on us (or this is a duplicate): go on.
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
        return;
    }
    PARKED.fetch_add(1, Ordering::AcqRel);
    futex_wake(&PARKED, 1);
    while RELEASE.load(Ordering::Acquire) == 0 {
        futex_wait(&RELEASE, 0, None);
    }
    let new_rip = e.new_rip.load(Ordering::Acquire);
    if new_rip != rip {
        // SAFETY: as above; writing the saved RIP makes sigreturn resume
        // there. The patcher only writes instruction boundaries of code that
        // is equivalent (relocated) to where the thread was.
        unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] = new_rip as i64 };
    }
    e.transition(tid, STOPPED, RESUMED);
    LEFT.fetch_add(1, Ordering::AcqRel);
    futex_wake(&LEFT, 1);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Lists the tids of the process with raw `getdents64` into `buf`, calling
/// `f` for each. No allocation.
fn for_each_tid(dirfd: i32, buf: &mut [u8], mut f: impl FnMut(i32)) -> Result<()> {
    // SAFETY: `dirfd` is an open directory descriptor owned by the caller.
    if unsafe { libc::lseek(dirfd, 0, libc::SEEK_SET) } < 0 {
        return Err(Error::os("lseek(/proc/self/task)"));
    }
    loop {
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dirfd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(Error::os("getdents64(/proc/self/task)"));
        }
        if n == 0 {
            return Ok(());
        }
        let mut off = 0usize;
        while off < n as usize {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name.
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            let mut tid: i32 = 0;
            let mut ok = false;
            for &b in name {
                if b == 0 {
                    break;
                }
                if !b.is_ascii_digit() {
                    ok = false;
                    break;
                }
                tid = tid.saturating_mul(10).saturating_add((b - b'0') as i32);
                ok = true;
            }
            if ok {
                f(tid);
            }
            off += reclen;
        }
    }
}

/// A thread that did not park.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Straggler {
    /// Its tid.
    pub tid: i32,
}

/// Every signal but the synchronous ones (faults, traps, `abort`): what the
/// stopping thread blocks while the world is stopped, and what the stop
/// handler blocks while a thread is parked. A handler that ran there (the
/// profiler's SIGPROF, a host's own) could wait on a lock a parked thread
/// holds — libgcc's `object_mutex` in an unwind, a `malloc` arena — and the
/// world would never be released. Blocked signals stay pending until the
/// release (a process-directed one may go to a straggler meanwhile, the only
/// thread not blocking it; the int3 protocol covers stragglers anyway).
fn async_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigfillset/sigdelset initialize and
    // edit it in place.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for s in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
            libc::SIGSYS,
            libc::SIGABRT,
        ] {
            libc::sigdelset(&mut set, s);
        }
        set
    }
}

/// The world, stopped. Dropping it releases the threads.
#[derive(Debug)]
pub struct Stopped {
    /// Threads parked in the signal handler (they report leaving it).
    parked: u32,
    released: bool,
    /// The ptrace helper of this stop, if a thread needed it.
    helper: Option<Helper>,
    /// Whether `PR_SET_PTRACER` was set for the helper (Yama scope 1).
    set_ptracer: bool,
    /// Blocks asynchronous signals on the stopping thread; dropping it on
    /// release restores the thread's previous mask.
    saved_mask: Option<MaskGuard>,
    /// Not `Send`: the release must run on the thread whose mask was saved.
    _same_thread: std::marker::PhantomData<*const ()>,
    /// Threads that did not park within the timeout.
    pub stragglers: [Straggler; 16],
    /// How many of `stragglers` are valid (more than 16 are counted, not listed).
    pub straggler_count: usize,
}

impl Stopped {
    /// Each parked thread's interrupted RIP, with a setter: `f(rip)` returns
    /// the RIP the thread should resume at.
    pub fn for_each_parked(&self, mut f: impl FnMut(RuntimeAddr) -> RuntimeAddr) {
        let mut f = |rip: usize| f(RuntimeAddr::from(rip)).as_usize();
        let n = COUNT.load(Ordering::Acquire);
        for e in &TABLE[..n] {
            if e.state() == STOPPED {
                let rip = e.new_rip.load(Ordering::Acquire) as usize;
                let to = f(rip);
                e.new_rip.store(to as u64, Ordering::Release);
                // A context the thread returns to later: interrupted by a
                // signal whose handler (blocking the stop signal, or below
                // our own handler) it is running now.
                scan_signal_frames(e.rsp.load(Ordering::Acquire), &mut f);
            }
        }
    }

    /// Each parked thread's interrupted RIP and RSP, read only (for
    /// [`crate::quiesce::range_in_use`]). Allocation-free.
    pub fn for_each_parked_regs(&self, mut f: impl FnMut(RuntimeAddr, RuntimeAddr)) {
        let n = COUNT.load(Ordering::Acquire);
        for e in &TABLE[..n] {
            if e.state() == STOPPED {
                f(
                    RuntimeAddr(e.new_rip.load(Ordering::Acquire)),
                    RuntimeAddr(e.rsp.load(Ordering::Acquire)),
                );
            }
        }
    }

    /// Whether every thread counted as parked is still stopped: false if
    /// the ptrace helper died since [`stop`] returned (the kernel then
    /// detached its tracees and they run again). A writer should check this
    /// right before writing and, if false, release and retry.
    pub fn still_stopped(&self) -> bool {
        !self.helper.as_ref().is_some_and(Helper::exited)
    }

    /// Releases the parked threads and waits until each has left the handler.
    pub fn release(mut self) {
        self.release_inner();
    }

    fn release_inner(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        RELEASE.store(1, Ordering::Release);
        futex_wake(&RELEASE, i32::MAX);
        // The helper writes any moved RIP, detaches its tracees and exits.
        // PT_GO too: a helper still waiting for it (never told to go) must
        // not wait forever.
        PT_GO.store(1, Ordering::Release);
        futex_wake(&PT_GO, 1);
        PT_REQ.fetch_add(1, Ordering::AcqRel);
        futex_wake(&PT_REQ, 1);
        loop {
            let left = LEFT.load(Ordering::Acquire);
            if left >= self.parked {
                break;
            }
            futex_wait(&LEFT, left, Some(Duration::from_millis(10)));
        }
        if let Some(mut h) = self.helper.take() {
            // Bounded work; killed after 10 s as a safety net (its tracees
            // are then detached by the kernel).
            h.wait(10_000_000_000);
        }
        if self.set_ptracer {
            self.set_ptracer = false;
            let _ = raw::prctl(libc::PR_SET_PTRACER, 0);
        }
        COUNT.store(0, Ordering::Release);
        // Restores this thread's own mask saved in `stop`; the pending
        // signals it unblocks are delivered now, with every other thread
        // running again.
        drop(self.saved_mask.take());
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.release_inner();
    }
}

/// Stops every other thread of the process, waiting up to `timeout` for each
/// to park. A thread whose mask blocks the stop signal is stopped with ptrace
/// by a helper process instead (no signal sent, no timeout waited). Threads
/// that do not stop (signal not taken in time, stuck in uninterruptible
/// sleep) are listed in [`Stopped::stragglers`]; their state is marked so
/// that a late signal makes them return at once.
///
/// Must be called with the patcher lock held (one stop at a time).
///
/// # Errors
/// `E_PATCH_OS` when the handler cannot be installed or `/proc/self/task` cannot
/// be read; `E_PATCH_THREAD_UNSTOPPABLE` when the process has more than
/// [`MAX_THREADS`] threads; `E_PATCH_PTRACE_DENIED` when a thread blocks both the
/// stop signal and `SIGTRAP` and may not be traced (nothing was written; the
/// message names the thread, its mask, the reason and what would allow it).
pub fn stop(timeout: Duration) -> Result<Stopped> {
    install_handler()?;
    let sig = SIGNAL.load(Ordering::Acquire);
    // SAFETY: the path is a NUL-terminated literal; open has no memory
    // preconditions beyond that.
    let dirfd = unsafe {
        libc::open(
            c"/proc/self/task".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dirfd < 0 {
        return Err(Error::os("open(/proc/self/task)"));
    }
    struct Fd(i32);
    impl Drop for Fd {
        fn drop(&mut self) {
            // SAFETY: we own this descriptor.
            unsafe { libc::close(self.0) };
        }
    }
    let _fd = Fd(dirfd);

    RELEASE.store(0, Ordering::Release);
    PARKED.store(0, Ordering::Release);
    LEFT.store(0, Ordering::Release);
    COUNT.store(0, Ordering::Release);
    PT_REQ.store(0, Ordering::Release);
    PT_DONE.store(0, Ordering::Release);
    PT_GO.store(0, Ordering::Release);
    let me = gettid();
    let pid = raw::getpid();
    let use_ptrace = PTRACE_ENABLED.load(Ordering::Acquire);
    let mut stopped = Stopped {
        parked: 0,
        released: false,
        helper: None,
        set_ptracer: false,
        saved_mask: None,
        _same_thread: std::marker::PhantomData,
        stragglers: [Straggler { tid: 0 }; 16],
        straggler_count: 0,
    };
    // No handler of ours or the host's runs on this thread until release
    // (see `async_signals`). Restored by `release_inner`, on every path:
    // an early return drops `stopped`, which releases.
    stopped.saved_mask = MaskGuard::block_raw(async_signals()).ok();
    let mut buf = [0u8; 4096];
    let mut overflow = false;
    // Each round lists the tids, signals (or hands to the helper) the new
    // ones and waits for them; the stop is complete when a listing taken
    // with everyone stopped finds no new thread (a thread that was still
    // running may have created one).
    for _round in 0..1000 {
        let mut new = 0;
        let mut pre = 0;
        for_each_tid(dirfd, &mut buf, |tid| {
            if tid == me {
                return;
            }
            let n = COUNT.load(Ordering::Acquire);
            if TABLE[..n].iter().any(|e| e.tid() == tid) {
                return;
            }
            if n == MAX_THREADS {
                overflow = true;
                return;
            }
            let e = &TABLE[n];
            e.mask.store(0, Ordering::Relaxed);
            e.tracer.store(0, Ordering::Relaxed);
            e.seized.store(false, Ordering::Relaxed);
            e.pt_err.store(0, Ordering::Relaxed);
            e.pt_sig.store(0, Ordering::Relaxed);
            e.pt_restart.store(0, Ordering::Relaxed);
            e.unsent.store(false, Ordering::Relaxed);
            e.rsp.store(0, Ordering::Relaxed);
            new += 1;
            // A thread that blocked the stop signal at an earlier stop and
            // still has it pending goes straight to ptrace: sending again
            // would queue one more real-time instance per stop until
            // RLIMIT_SIGPENDING is reached (tgkill: EAGAIN).
            if use_ptrace && was_blocker(tid) {
                if let Some(st) = status::task_status(tid) {
                    if st.blocks(sig) && st.pending(sig) {
                        e.mask.store(st.sig_blk, Ordering::Relaxed);
                        e.tracer.store(st.tracer_pid, Ordering::Relaxed);
                        e.word.store(pack(tid, PT_WANT), Ordering::Release);
                        COUNT.store(n + 1, Ordering::Release);
                        pre += 1;
                        return;
                    }
                }
            }
            e.word.store(pack(tid, SENT), Ordering::Release);
            COUNT.store(n + 1, Ordering::Release);
            match raw::tgkill(pid, tid, sig) {
                Ok(_) => {}
                // The thread exited. Nothing to wait for.
                Err(libc::ESRCH) => e.word.store(pack(tid, EMPTY), Ordering::Release),
                // Any other error (EAGAIN: RLIMIT_SIGPENDING reached, the
                // real-time signal could not be queued) leaves the slot
                // `SENT`, never "gone": the probe hands the thread to ptrace
                // (or, with ptrace off, it is a straggler).
                Err(_) => e.unsent.store(true, Ordering::Release),
            }
        })?;
        if overflow || new == 0 {
            break;
        }
        if pre > 0 {
            start_ptrace_batch(&mut stopped, timeout);
        }
        let deadline = Instant::now() + timeout;
        wait_for_stops(&mut stopped, sig, use_ptrace, timeout, deadline);
        if TABLE[..COUNT.load(Ordering::Acquire)]
            .iter()
            .any(|e| e.state() == PT_FAILED)
        {
            break;
        }
    }
    if overflow {
        give_up_on_unparked(&mut stopped);
        drop(stopped);
        return Err(Error::ThreadUnstoppable {
            tid: 0,
            detail: format!("more than {MAX_THREADS} threads"),
        });
    }
    // A thread ptrace could not take: if it does not block SIGTRAP either,
    // it is a straggler for the caller to vet (the int3 protocol may still
    // do); else nothing can keep it out of the bytes: refuse now.
    let mut denied = None;
    for e in &TABLE[..COUNT.load(Ordering::Acquire)] {
        let tid = e.tid();
        if e.state() != PT_FAILED {
            continue;
        }
        let mask = e.mask.load(Ordering::Relaxed);
        if mask & (1u64 << (libc::SIGTRAP - 1)) != 0 {
            if denied.is_none() {
                denied = Some((
                    tid,
                    mask,
                    e.pt_err.load(Ordering::Relaxed),
                    e.tracer.load(Ordering::Relaxed),
                ));
            }
        } else {
            e.transition(tid, PT_FAILED, SENT);
        }
    }
    // Re-check: a helper that died after stopping threads let them run
    // again (the kernel detached them); they are stragglers, not parked.
    if stopped.helper.as_ref().is_some_and(Helper::exited) {
        helper_died_after_stops();
    }
    give_up_on_unparked(&mut stopped);
    if let Some((tid, mask, errno, tracer)) = denied {
        // Release first: the message allocates.
        drop(stopped);
        stats::bump(&stats::REFUSED_PTRACE);
        let d = if errno == HELPER_DIED {
            ptrace::Denial {
                reason: "the ptrace helper process was killed while seizing it (a seccomp filter that kills on ptrace?)".into(),
                fix: "allow ptrace(PTRACE_SEIZE/INTERRUPT/GETREGS/SETREGS/DETACH) in the seccomp filter".into(),
            }
        } else {
            ptrace::permission().explain_errno(errno, tracer)
        };
        return Err(Error::PtraceDenied {
            tid,
            mask,
            signal: sig,
            reason: d.reason,
            fix: d.fix,
        });
    }
    Ok(stopped)
}

/// Tids that blocked the stop signal with it pending at an earlier stop
/// (a small ring; a reused tid is harmless: its status is read first).
static BLOCKERS: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];
static BLOCKERS_NEXT: AtomicUsize = AtomicUsize::new(0);

fn remember_blocker(tid: i32) {
    if was_blocker(tid) {
        return;
    }
    let i = BLOCKERS_NEXT.fetch_add(1, Ordering::Relaxed) % BLOCKERS.len();
    BLOCKERS[i].store(tid, Ordering::Relaxed);
}

fn was_blocker(tid: i32) -> bool {
    BLOCKERS.iter().any(|t| t.load(Ordering::Relaxed) == tid)
}

/// `pt_err` of a thread the helper was to seize when the helper died.
const HELPER_DIED: i32 = -1;

/// Hands the `PT_WANT` threads to the helper, starting it on first use.
/// If it cannot start, they are marked `PT_FAILED` with the `errno`.
fn start_ptrace_batch(stopped: &mut Stopped, timeout: Duration) {
    PT_DEADLINE.store(
        raw::monotonic_ns().saturating_add(timeout.as_nanos().min(u64::MAX as u128) as u64),
        Ordering::Release,
    );
    if stopped.helper.is_none() {
        // SAFETY: `tracer` follows the helper contract (atomics, the static
        // table and `hotpatch_sys::raw`/`ptrace` calls only; no errno, TLS,
        // allocation, lock or panic; bounded by PT_DEADLINE and the release);
        // it takes no argument; `stopped` waits for it on release.
        match unsafe { helper::spawn(&HELPER_STACK, tracer, std::ptr::null_mut()) } {
            Ok(h) => {
                stats::bump(&stats::PTRACE_HELPERS);
                // Yama scope 1 lets only ancestors trace us, unless named.
                if status::yama_scope() == Some(1)
                    && raw::prctl(libc::PR_SET_PTRACER, h.pid() as usize).is_ok()
                {
                    stopped.set_ptracer = true;
                }
                stopped.helper = Some(h);
                PT_GO.store(1, Ordering::Release);
                futex_wake(&PT_GO, 1);
            }
            Err(errno) => {
                for e in &TABLE[..COUNT.load(Ordering::Acquire)] {
                    let tid = e.tid();
                    if e.state() == PT_WANT {
                        e.pt_err.store(errno, Ordering::Relaxed);
                        e.transition(tid, PT_WANT, PT_FAILED);
                    }
                }
                return;
            }
        }
    }
    PT_REQ.fetch_add(1, Ordering::AcqRel);
    futex_wake(&PT_REQ, 1);
}

/// How long signalled threads get to park before the ones still running
/// have their masks read (`/proc/self/task/<tid>/status`); those blocking
/// the stop signal then go to ptrace. Reading every thread's status before
/// signalling would cost every stop tens of µs per thread (DESIGN-NOTES.md);
/// this way only slow stops pay, and a blocking thread is known within this
/// delay instead of the stop timeout.
const PROBE_AFTER: Duration = Duration::from_micros(250);

/// Waits until every signalled thread has parked (or `deadline`) and the
/// helper has finished its batches (it is bounded by `PT_DEADLINE`). After
/// [`PROBE_AFTER`], threads still not parked whose mask blocks `sig` are
/// handed to the ptrace helper (when `use_ptrace`).
fn wait_for_stops(
    stopped: &mut Stopped,
    sig: i32,
    use_ptrace: bool,
    timeout: Duration,
    deadline: Instant,
) {
    let probe_at = Instant::now() + PROBE_AFTER;
    let mut probed = !use_ptrace;
    loop {
        let n = COUNT.load(Ordering::Acquire);
        let sent = TABLE[..n].iter().filter(|e| e.state() == SENT).count();
        if !probed && sent > 0 && Instant::now() >= probe_at {
            probed = true;
            let mut moved = 0;
            for e in &TABLE[..n] {
                let tid = e.tid();
                if e.state() != SENT {
                    continue;
                }
                let Some(st) = status::task_status(tid) else {
                    continue;
                };
                // Blocked *and still pending*: a thread that is inside our
                // handler right now (whose `sa_mask` blocks the signal too)
                // has had it delivered, so it is not pending; moving that
                // thread to ptrace would stop it inside the handler, away
                // from the context the fix-up must see.
                // A thread the signal could not be queued to is taken
                // whatever its mask.
                if !(e.unsent.load(Ordering::Acquire) || st.blocks(sig) && st.pending(sig)) {
                    continue;
                }
                e.mask.store(st.sig_blk, Ordering::Relaxed);
                e.tracer.store(st.tracer_pid, Ordering::Relaxed);
                // The signal stays pending; if the thread unblocks it later,
                // the handler finds no `SENT` slot and returns at once.
                if e.transition(tid, SENT, PT_WANT) {
                    if st.blocks(sig) && st.pending(sig) {
                        remember_blocker(tid);
                    }
                    moved += 1;
                }
            }
            if moved > 0 {
                start_ptrace_batch(stopped, timeout);
            }
            continue;
        }
        let helper_died = stopped.helper.as_ref().is_some_and(Helper::exited);
        if helper_died {
            // Killed (e.g. a seccomp filter that kills on ptrace): the
            // kernel detached whatever it had seized.
            for e in &TABLE[..n] {
                let tid = e.tid();
                if e.state() == PT_WANT {
                    e.seized.store(false, Ordering::Release);
                    e.pt_err.store(HELPER_DIED, Ordering::Relaxed);
                    e.transition(tid, PT_WANT, PT_FAILED);
                }
            }
        }
        let helper_done =
            helper_died || PT_DONE.load(Ordering::Acquire) == PT_REQ.load(Ordering::Acquire);
        let now = Instant::now();
        if helper_done && (sent == 0 || now >= deadline) {
            return;
        }
        let parked = PARKED.load(Ordering::Acquire);
        let mut wait = if now >= deadline {
            Duration::from_millis(1)
        } else {
            (deadline - now).min(Duration::from_millis(1))
        };
        if !probed {
            wait = wait.min(probe_at.saturating_duration_since(now));
        }
        futex_wait(&PARKED, parked, Some(wait));
    }
}

/// The helper's body (see `hotpatch_sys::helper` for what it may do): serve
/// batches until released, then detach everything and return.
extern "C" fn tracer(_arg: *mut c_void) -> c_int {
    while PT_GO.load(Ordering::Acquire) == 0 {
        raw::futex_wait(&PT_GO, 0, 0);
    }
    let mut seen = 0u32;
    loop {
        if RELEASE.load(Ordering::Acquire) == 1 {
            break;
        }
        let req = PT_REQ.load(Ordering::Acquire);
        if req != seen {
            seen = req;
            trace_batch();
            PT_DONE.store(seen, Ordering::Release);
            PARKED.fetch_add(1, Ordering::AcqRel);
            raw::futex_wake(&PARKED, 1);
            continue;
        }
        raw::futex_wait(&PT_REQ, req, 0);
    }
    resume_all();
    0
}

/// Seizes and interrupts every `PT_WANT` thread, then collects their stops
/// until all are stopped or `PT_DEADLINE` passes. Runs in the helper.
fn trace_batch() {
    let n = COUNT.load(Ordering::Acquire).min(MAX_THREADS);
    for e in TABLE.iter().take(n) {
        let tid = e.tid();
        if e.state() != PT_WANT || e.seized.load(Ordering::Acquire) {
            continue;
        }
        match ptrace::seize(tid) {
            Ok(()) => {
                e.seized.store(true, Ordering::Release);
                let _ = ptrace::interrupt(tid);
            }
            Err(libc::ESRCH) => {
                e.transition(tid, PT_WANT, EMPTY);
            }
            Err(errno) => {
                e.pt_err.store(errno, Ordering::Relaxed);
                e.transition(tid, PT_WANT, PT_FAILED);
            }
        }
    }
    let deadline = PT_DEADLINE.load(Ordering::Acquire);
    let mut pause: u64 = 2_000;
    loop {
        let mut pending = 0u32;
        for e in TABLE.iter().take(n) {
            let tid = e.tid();
            if e.state() != PT_WANT || !e.seized.load(Ordering::Acquire) {
                continue;
            }
            match ptrace::wait(tid, false) {
                Ok(ptrace::Wait::NotYet) => pending = pending.saturating_add(1),
                Ok(ptrace::Wait::Stopped { signal })
                    if raw::tgkill(raw::getppid(), tid, 0) == Err(libc::ESRCH) =>
                {
                    // The tid is no longer a thread of ours (it exited and
                    // the number was reused by another process between the
                    // listing and the seize): let it go, it is not ours.
                    let _ = ptrace::detach(tid, signal);
                    e.seized.store(false, Ordering::Release);
                    e.transition(tid, PT_WANT, EMPTY);
                }
                Ok(ptrace::Wait::Stopped { signal }) => {
                    e.pt_sig.store(signal, Ordering::Relaxed);
                    let mut regs = ptrace::zeroed_regs();
                    if ptrace::getregs(tid, &mut regs).is_ok() {
                        // Stopped inside a system call that the kernel will
                        // restart on resume: it rewinds RIP by 2 (the
                        // `syscall` instruction) then, so that is where the
                        // thread is, as the signal path sees it.
                        let adj = restart_rewind(&regs);
                        if adj != 0 {
                            stats::bump(&stats::PTRACE_RESTARTS);
                        }
                        e.pt_restart.store(adj, Ordering::Relaxed);
                        e.rsp.store(regs.rsp, Ordering::Relaxed);
                        e.rip.store(regs.rip.wrapping_sub(adj), Ordering::Relaxed);
                        e.new_rip
                            .store(regs.rip.wrapping_sub(adj), Ordering::Relaxed);
                        e.transition(tid, PT_WANT, STOPPED);
                        stats::bump(&stats::PTRACE_STOPS);
                    } else {
                        // Gone between the stop and the read.
                        let _ = ptrace::detach(tid, signal);
                        e.seized.store(false, Ordering::Release);
                        e.transition(tid, PT_WANT, EMPTY);
                    }
                }
                Ok(ptrace::Wait::Gone) | Err(_) => {
                    // Gone, unless it still exists: then it counts as not
                    // stopped (a straggler at the deadline), never as absent.
                    if raw::tgkill(raw::getppid(), tid, 0).is_ok() {
                        pending = pending.saturating_add(1);
                    } else {
                        e.seized.store(false, Ordering::Release);
                        e.transition(tid, PT_WANT, EMPTY);
                    }
                }
            }
        }
        if pending == 0 || raw::monotonic_ns() >= deadline {
            return;
        }
        raw::sleep_ns(pause);
        pause = (pause.saturating_mul(2)).min(200_000);
    }
}

/// `-ERESTARTSYS`, `-ERESTARTNOINTR`, `-ERESTARTNOHAND`,
/// `-ERESTART_RESTARTBLOCK` (include/linux/errno.h): a system call
/// interrupted by our ptrace stop that the kernel restarts on resume by
/// rewinding RIP over the 2-byte `syscall` (also `int 0x80`, `sysenter`'s
/// vDSO path re-enters through a 2-byte instruction as well).
const RESTART_CODES: [i64; 4] = [-512, -513, -514, -516];

/// How far the kernel will rewind RIP when this stopped tracee resumes: 2
/// inside a restartable system call, else 0.
fn restart_rewind(regs: &ptrace::Regs) -> u64 {
    if (regs.orig_rax as i64) >= 0 && RESTART_CODES.contains(&(regs.rax as i64)) {
        2
    } else {
        0
    }
}

/// After the release: writes each moved RIP, detaches every tracee with the
/// signal it was stopped for. Runs in the helper.
fn resume_all() {
    let n = COUNT.load(Ordering::Acquire).min(MAX_THREADS);
    for e in TABLE.iter().take(n) {
        if !e.seized.load(Ordering::Acquire) {
            continue;
        }
        let tid = e.tid();
        if e.state() == STOPPED {
            let rip = e.rip.load(Ordering::Acquire);
            let new_rip = e.new_rip.load(Ordering::Acquire);
            if new_rip != rip {
                let mut regs = ptrace::zeroed_regs();
                if ptrace::getregs(tid, &mut regs).is_ok() {
                    // Keep the restart: write the address *after* the
                    // relocated `syscall`, the kernel rewinds onto it and
                    // the call restarts there exactly as it would have in
                    // place (or, if a re-injected signal's handler ends it
                    // with EINTR instead, the thread continues after the
                    // relocated `syscall`: also equivalent).
                    regs.rip = new_rip.wrapping_add(e.pt_restart.load(Ordering::Relaxed));
                    let _ = ptrace::setregs(tid, &regs);
                }
            }
            let _ = ptrace::detach(tid, e.pt_sig.load(Ordering::Relaxed));
            e.transition(tid, STOPPED, RESUMED);
        } else if let Ok(ptrace::Wait::Stopped { signal }) = ptrace::wait(tid, false) {
            // Seized but not stopped in time (a straggler): it may have
            // stopped since. A tracee still running is detached by our exit.
            let _ = ptrace::detach(tid, signal);
        }
        e.seized.store(false, Ordering::Release);
    }
}

/// The helper is gone: the threads it had stopped run again. Their
/// `STOPPED` entries become `GAVE_UP` (stragglers for the caller to vet).
fn helper_died_after_stops() {
    let n = COUNT.load(Ordering::Acquire);
    for e in &TABLE[..n] {
        let tid = e.tid();
        if e.seized.load(Ordering::Acquire) && e.transition(tid, STOPPED, GAVE_UP) {
            e.seized.store(false, Ordering::Release);
            if raw::tgkill(raw::getpid(), tid, 0).is_ok() {
                // Listed by `give_up_on_unparked`'s pass below via `SENT`.
                e.word.store(pack(tid, SENT), Ordering::Release);
            }
        }
    }
}

/// Marks every thread still `SENT` (or seized but not stopped) as given up
/// (a late signal returns at once), records it as a straggler, and counts
/// the threads parked in the signal handler.
fn give_up_on_unparked(stopped: &mut Stopped) {
    let n = COUNT.load(Ordering::Acquire);
    let mut parked = 0;
    for e in &TABLE[..n] {
        let tid = e.tid();
        if e.transition(tid, SENT, GAVE_UP) || e.transition(tid, PT_WANT, GAVE_UP) {
            let alive = raw::tgkill(raw::getpid(), tid, 0).is_ok();
            if alive {
                if stopped.straggler_count < stopped.stragglers.len() {
                    stopped.stragglers[stopped.straggler_count] = Straggler { tid };
                }
                stopped.straggler_count += 1;
            }
        } else if e.state() == STOPPED && !e.seized.load(Ordering::Acquire) {
            parked += 1;
        }
    }
    stopped.parked = parked;
}

pub use hotpatch_sys::ptrace::{Denial, Permission};

/// A thread whose mask blocks the stop signal (so it is stopped with ptrace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockingThread {
    /// Its tid.
    pub tid: i32,
    /// Its `SigBlk` mask.
    pub sig_blk: u64,
    /// Its `TracerPid` (0 if none).
    pub tracer_pid: i32,
    /// Whether it also blocks `SIGTRAP` (then the int3 protocol cannot stand
    /// in for ptrace).
    pub blocks_sigtrap: bool,
    /// Why ptrace may not stop it, if it certainly may not.
    pub denial: Option<Denial>,
}

/// What a patch would meet, known before one is tried: which threads block
/// the stop signal and whether ptrace may stop them (`hotpatch inspect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// The stop signal (installed, requested, or the default `SIGRTMIN+7`).
    pub stop_signal: i32,
    /// Whether the ptrace path is on ([`set_ptrace_enabled`]).
    pub ptrace_enabled: bool,
    /// The process's ptrace-relevant state.
    pub permission: Permission,
    /// The threads (other than the caller) that block the stop signal.
    pub threads: Vec<BlockingThread>,
}

impl Readiness {
    /// The first thread an install would be refused for with
    /// `E_PATCH_PTRACE_DENIED` (a seccomp filter is only found by trying).
    pub fn refused(&self) -> Option<&BlockingThread> {
        self.threads
            .iter()
            .find(|t| t.blocks_sigtrap && t.denial.is_some())
    }
}

impl Readiness {
    /// The `E_PATCH_PTRACE_DENIED` error an install would return now, if any.
    pub fn refusal(&self) -> Option<Error> {
        let t = self.refused()?;
        let d = t.denial.clone()?;
        Some(Error::PtraceDenied {
            tid: t.tid,
            mask: t.sig_blk,
            signal: self.stop_signal,
            reason: d.reason,
            fix: d.fix,
        })
    }
}

impl std::fmt::Display for Readiness {
    /// Lines for a report (`hotpatch inspect`): the threads that block the
    /// stop signal and how each will be stopped.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.threads.is_empty() {
            return writeln!(
                f,
                "stop-the-world: every thread takes the stop signal {}",
                self.stop_signal
            );
        }
        writeln!(
            f,
            "stop-the-world: {} thread(s) block the stop signal {}:",
            self.threads.len(),
            self.stop_signal
        )?;
        for t in &self.threads {
            let how = match (&t.denial, self.ptrace_enabled) {
                (_, false) => "ptrace path off: a straggler (int3 protocol or refusal)".to_string(),
                (None, true) if self.permission.seccomp == 2 => {
                    "stopped with ptrace, unless the seccomp filter (Seccomp: 2) denies it (only trying tells)"
                        .to_string()
                }
                (None, true) => "stopped with ptrace".to_string(),
                (Some(d), true) if t.blocks_sigtrap => {
                    format!(
                        "REFUSED (E_PATCH_PTRACE_DENIED): {}; to allow it: {}",
                        d.reason, d.fix
                    )
                }
                (Some(d), true) => format!(
                    "not by ptrace ({}): a straggler (int3 protocol if it sleeps outside the bytes)",
                    d.reason
                ),
            };
            writeln!(f, "  thread {} SigBlk {:016x}: {how}", t.tid, t.sig_blk)?;
        }
        Ok(())
    }
}

/// Reads every thread's mask and the ptrace permission. Allocates: call with
/// the world running.
pub fn readiness() -> Readiness {
    let sig = match SIGNAL.load(Ordering::Acquire) {
        0 => match REQUESTED_SIGNAL.load(Ordering::Acquire) {
            0 => libc::SIGRTMIN() + 7,
            s => s,
        },
        s => s,
    };
    let permission = ptrace::permission();
    let me = gettid();
    let mut threads = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for d in dir.flatten() {
            let Some(tid) = d.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else {
                continue;
            };
            if tid == me {
                continue;
            }
            let Some(st) = status::task_status(tid) else {
                continue;
            };
            if !st.blocks(sig) {
                continue;
            }
            threads.push(BlockingThread {
                tid,
                sig_blk: st.sig_blk,
                tracer_pid: st.tracer_pid,
                blocks_sigtrap: st.blocks(libc::SIGTRAP),
                denial: permission.check(st.tracer_pid).err(),
            });
        }
    }
    threads.sort_by_key(|t| t.tid);
    Readiness {
        stop_signal: sig,
        ptrace_enabled: ptrace_enabled(),
        permission,
        threads,
    }
}

/// What `/proc/self/task/<tid>/syscall` says about a thread that did not park.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whereabouts {
    /// Blocked in a system call; user-space PC is known.
    InSyscall {
        /// The user-space instruction pointer (after the `syscall` instruction).
        pc: RuntimeAddr,
    },
    /// Running (or runnable) in user space: position unknown.
    Running,
    /// Gone, or the file could not be read.
    Unknown,
}

/// Reads where a non-parked thread is, without allocating.
pub fn whereabouts(tid: i32) -> Whereabouts {
    let mut buf = [0u8; 256];
    let n = match hotpatch_sys::status::read_task_file(tid, b"syscall", &mut buf) {
        Some(n) if n > 0 => n,
        _ => return Whereabouts::Unknown,
    };
    let text = &buf[..n];
    if text.starts_with(b"running") {
        return Whereabouts::Running;
    }
    // "nr a1 a2 a3 a4 a5 a6 sp pc": the last field is the PC.
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let Some(last) = text.rsplit(|&b| b == b' ').next() else {
        return Whereabouts::Unknown;
    };
    let hex = last.strip_prefix(b"0x").unwrap_or(last);
    let mut pc: usize = 0;
    for &b in hex {
        let v = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return Whereabouts::Unknown,
        };
        pc = pc.wrapping_shl(4) | v as usize;
    }
    // "-1 sp pc" (not in a syscall but stopped) has 3 fields; nr >= 0 means blocked.
    if text.starts_with(b"-1") {
        return Whereabouts::Running;
    }
    Whereabouts::InSyscall {
        pc: RuntimeAddr::from(pc),
    }
}

/// Whether thread `tid` blocks `sig` (from `/proc/self/task/<tid>/status`).
/// `None` when it cannot be read. Allocates: call only with the world running.
pub fn blocks_signal(tid: i32, sig: i32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("SigBlk:"))?;
    let mask = u64::from_str_radix(line["SigBlk:".len()..].trim(), 16).ok()?;
    Some(mask & (1u64 << (sig - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn stops_and_releases_spinning_threads() {
        let quit = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let quit = quit.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !quit.load(Ordering::Relaxed) {
                        n = n.wrapping_add(1);
                        std::hint::spin_loop();
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        let guard = crate::site::lock_global();
        // 5 s: only bounds how long a thread may take to reach its stop
        // (a thread of another test not scheduled for 500 ms on a busy
        // machine would be a straggler); the time is not what is checked.
        let s = stop(Duration::from_secs(5)).expect("stop");
        let mut seen = 0;
        s.for_each_parked(|rip| {
            seen += 1;
            rip
        });
        let stragglers = s.straggler_count;
        s.release();
        drop(guard);
        assert!(seen >= 3, "parked {seen} threads");
        assert_eq!(stragglers, 0);
        quit.store(true, Ordering::Relaxed);
        for h in handles {
            assert!(h.join().expect("thread") > 0);
        }
    }
    /// Threads blocking every signal (spinning, and sleeping in a system
    /// call) are stopped with ptrace: reported parked, not stragglers, and
    /// run on after the release.
    #[test]
    fn threads_blocking_every_signal_are_stopped_with_ptrace() {
        let quit = Arc::new(AtomicBool::new(false));
        let spins = Arc::new(AtomicU64::new(0));
        let masked = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (quit, spins, masked) = (quit.clone(), spins.clone(), masked.clone());
                std::thread::spawn(move || {
                    // Every signal blocked on this thread, for its life.
                    let _mask = MaskGuard::block_all().expect("block every signal");
                    masked.fetch_add(1, Ordering::Release);
                    while !quit.load(Ordering::Relaxed) {
                        if i % 2 == 0 {
                            spins.fetch_add(1, Ordering::Relaxed);
                        } else {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                })
            })
            .collect();
        // All four block every signal before the first stop (on a busy
        // machine a sleeper may not have run yet when the spinners have:
        // it would be stopped by the signal path, not ptrace).
        while spins.load(Ordering::Relaxed) < 1000 || masked.load(Ordering::Acquire) < 4 {
            std::thread::yield_now();
        }
        let before = crate::stats();
        for _ in 0..20 {
            let guard = crate::site::lock_global();
            let s = stop(Duration::from_secs(5)).expect("stop");
            let mut seen = 0;
            s.for_each_parked(|rip| {
                seen += 1;
                rip
            });
            let stragglers = s.straggler_count;
            let frozen = spins.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(2));
            let still = spins.load(Ordering::Relaxed);
            s.release();
            drop(guard);
            assert!(seen >= 4, "parked {seen} threads");
            assert_eq!(stragglers, 0);
            assert_eq!(frozen, still, "spinners did not run while stopped");
        }
        let after = crate::stats();
        assert!(
            after.ptrace_stops >= before.ptrace_stops + 80,
            "{before:?} {after:?}"
        );
        let at = spins.load(Ordering::Relaxed);
        while spins.load(Ordering::Relaxed) == at {
            std::thread::yield_now();
        }
        quit.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().expect("thread");
        }
    }
}
