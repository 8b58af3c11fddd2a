//! A helper process that shares our memory but not our thread group.
//!
//! The kernel refuses `ptrace` between threads of one thread group, so a
//! thread of ours cannot stop another with ptrace. The helper is a
//! `clone(CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_UNTRACED)` child: a
//! process of its own (its own pid, not in `/proc/self/task`) that runs a
//! function of ours on a stack of ours, so it reads and writes our statics
//! directly — no pipe, no serialization, no `fork` copying the page tables.
//!
//! What the helper may do (the contract of [`spawn`]'s `f`): it shares
//! the *creating thread's* thread-local storage (`%fs` is inherited), so it
//! must not touch `errno` or any thread-local, must not allocate (another
//! thread may hold malloc's lock, and it would be the creating thread's
//! tcache), must not take locks, must not panic (the panic machinery uses
//! thread-locals and `abort` would signal the *creating* thread). In
//! practice: atomics and [`crate::raw`] system calls only.
//!
//! Lifetime: its exit signal is 0 (no `SIGCHLD` reaches the host's handler;
//! a host reaping with `waitpid(-1)` without `__WALL` does not see it), its
//! parent-death signal is `SIGKILL` (if our process dies the helper dies,
//! and the kernel detaches whatever it traced), it blocks every signal, and
//! [`Helper::wait`] reaps it (`CLONE_CHILD_CLEARTID` futex, then `wait4`
//! with `__WALL`). One helper per [`HelperStack`] at a time.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};

use crate::raw;

const STACK_LEN: usize = 256 * 1024;
const GUARD_LEN: usize = 64 * 1024;

/// A stack for one helper at a time, mapped on first use and kept.
#[derive(Debug)]
pub struct HelperStack {
    base: AtomicUsize,
    busy: AtomicU32,
    /// `CLONE_PARENT_SETTID` / `CLONE_CHILD_CLEARTID` word: the helper's pid
    /// while it lives, 0 once it has exited.
    ctid: AtomicU32,
    f: AtomicUsize,
    arg: AtomicUsize,
    parent: AtomicI32,
}

impl HelperStack {
    /// An unmapped stack (mapped by the first [`spawn`]).
    pub const fn new() -> HelperStack {
        HelperStack {
            base: AtomicUsize::new(0),
            busy: AtomicU32::new(0),
            ctid: AtomicU32::new(0),
            f: AtomicUsize::new(0),
            arg: AtomicUsize::new(0),
            parent: AtomicI32::new(0),
        }
    }

    /// The mapped region's base (guard page first), mapping it if needed.
    fn mapped(&self) -> Result<usize, i32> {
        let b = self.base.load(Ordering::Acquire);
        if b != 0 {
            return Ok(b);
        }
        // SAFETY: a fresh private anonymous mapping; nothing else refers to
        // it. mmap is a plain system call (no allocation, no lock).
        let b = unsafe {
            raw::syscall6(
                libc::SYS_mmap,
                0,
                GUARD_LEN + STACK_LEN,
                (libc::PROT_READ | libc::PROT_WRITE) as usize,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE) as usize,
                usize::MAX,
                0,
            )
        }?;
        // The lowest 64 KiB is a guard: an overflow faults instead of
        // writing into whatever lies below.
        // SAFETY: our own fresh mapping.
        let _ = unsafe {
            raw::syscall6(
                libc::SYS_mprotect,
                b,
                GUARD_LEN,
                libc::PROT_NONE as usize,
                0,
                0,
                0,
            )
        };
        self.base.store(b, Ordering::Release);
        Ok(b)
    }
}

impl Default for HelperStack {
    fn default() -> Self {
        HelperStack::new()
    }
}

/// A running (or exited, not yet reaped) helper.
#[derive(Debug)]
pub struct Helper {
    stack: &'static HelperStack,
    pid: i32,
    reaped: bool,
}

/// Runs in the child: parent-death signal, signals blocked, then `f`.
extern "C" fn entry(arg: *mut c_void) -> c_int {
    // SAFETY: `spawn` passes a pointer to a 'static HelperStack.
    let st = unsafe { &*(arg as *const HelperStack) };
    let _ = raw::block_all_signals();
    let _ = raw::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as usize);
    // The parent may have died before the prctl: then nobody waits for us.
    if raw::getppid() != st.parent.load(Ordering::Acquire) {
        raw::exit_thread(1);
    }
    let f = st.f.load(Ordering::Acquire);
    // SAFETY: `spawn` stored an `extern "C" fn(*mut c_void) -> c_int`.
    let f: extern "C" fn(*mut c_void) -> c_int = unsafe { core::mem::transmute(f) };
    let code = f(st.arg.load(Ordering::Acquire) as *mut c_void);
    raw::exit_thread(code)
}

/// Starts a helper running `f(arg)` on `stack`.
///
/// Async-signal-safe on the caller's side (an `mmap` on first use, then
/// glibc's `clone`, which neither allocates nor locks).
///
/// # Safety
/// `f` must follow the helper contract in the module docs (atomics and
/// [`crate::raw`] calls only: no `errno`, thread-locals, allocation, locks
/// or panics), must return in bounded time, and `arg` must stay valid
/// until [`Helper::wait`] returns. The returned [`Helper`] must be waited
/// for (dropping it waits) before `stack` is used again.
pub unsafe fn spawn(
    stack: &'static HelperStack,
    f: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
) -> Result<Helper, i32> {
    if stack.busy.swap(1, Ordering::AcqRel) != 0 {
        return Err(libc::EBUSY);
    }
    let base = match stack.mapped() {
        Ok(b) => b,
        Err(e) => {
            stack.busy.store(0, Ordering::Release);
            return Err(e);
        }
    };
    stack.f.store(f as usize, Ordering::Release);
    stack.arg.store(arg as usize, Ordering::Release);
    stack.parent.store(raw::getpid(), Ordering::Release);
    stack.ctid.store(u32::MAX, Ordering::Release);
    let top = (base + GUARD_LEN + STACK_LEN) & !15;
    let flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_UNTRACED
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID;
    // SAFETY: `top` is the 16-aligned end of a stack we own and nobody else
    // uses (`busy`); `entry` only reads the 'static `stack`; the ctid word is
    // 'static so the kernel's write and clear at exit stay in bounds. Exit
    // signal 0 (low byte of flags). The parent's errno may be set on failure.
    let pid = unsafe {
        libc::clone(
            entry,
            top as *mut c_void,
            flags,
            stack as *const HelperStack as *mut c_void,
            stack.ctid.as_ptr(),
            core::ptr::null_mut::<c_void>(),
            stack.ctid.as_ptr(),
        )
    };
    if pid <= 0 {
        // SAFETY: reading our own errno right after the failed call.
        let e = unsafe { *libc::__errno_location() };
        stack.busy.store(0, Ordering::Release);
        return Err(e);
    }
    Ok(Helper {
        stack,
        pid,
        reaped: false,
    })
}

impl Helper {
    /// The helper's pid (also the tracer pid its tracees show).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the helper has exited (it may still need reaping).
    pub fn exited(&self) -> bool {
        self.stack.ctid.load(Ordering::Acquire) == 0
    }

    /// Waits until the helper has exited and reaps it. If it has not exited
    /// after `kill_after_ns`, it is killed (the kernel then detaches its
    /// tracees) — a safety net; the helper's work is bounded. Returns its
    /// exit status word.
    pub fn wait(&mut self, kill_after_ns: u64) -> i32 {
        if self.reaped {
            return 0;
        }
        let start = raw::monotonic_ns();
        let mut killed = false;
        loop {
            let v = self.stack.ctid.load(Ordering::Acquire);
            if v == 0 {
                break;
            }
            if !killed && raw::monotonic_ns().saturating_sub(start) > kill_after_ns {
                // SAFETY: kill of our own helper's pid; it has not been
                // reaped, so the pid cannot have been reused.
                let _ = unsafe {
                    raw::syscall6(
                        libc::SYS_kill,
                        self.pid as usize,
                        libc::SIGKILL as usize,
                        0,
                        0,
                        0,
                        0,
                    )
                };
                killed = true;
            }
            futex_wait_shared(&self.stack.ctid, v, 10_000_000);
        }
        let status = loop {
            match raw::wait4(self.pid, libc::__WALL) {
                Ok((_, s)) => break s,
                Err(libc::EINTR) => continue,
                Err(_) => break 0,
            }
        };
        self.reaped = true;
        self.stack.busy.store(0, Ordering::Release);
        status
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.wait(10_000_000_000);
    }
}

/// The kernel wakes a `CLONE_CHILD_CLEARTID` word as a *shared* futex.
fn futex_wait_shared(word: &AtomicU32, expected: u32, timeout_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `word` is a live aligned u32; `ts` is on our stack.
    let _ = unsafe {
        raw::syscall6(
            libc::SYS_futex,
            word.as_ptr() as usize,
            libc::FUTEX_WAIT as usize,
            expected as usize,
            &ts as *const _ as usize,
            0,
            0,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::AtomicU64;

    static STACK: HelperStack = HelperStack::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);

    extern "C" fn child(arg: *mut c_void) -> c_int {
        SEEN.store(
            arg as u64 ^ ((raw::getpid() as u64) << 32),
            Ordering::Release,
        );
        7
    }

    #[test]
    fn helper_shares_memory_and_is_another_process() {
        for round in 0..3u64 {
            // SAFETY: `child` only does atomics and raw calls; arg is a value.
            let mut h =
                unsafe { spawn(&STACK, child, (0x55 + round) as *mut c_void) }.expect("spawn");
            let pid = h.pid();
            let status = h.wait(5_000_000_000);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7,
                "{status:#x}"
            );
            let seen = SEEN.load(Ordering::Acquire);
            assert_eq!(seen & 0xffff_ffff, 0x55 + round);
            assert_eq!((seen >> 32) as i32, pid, "its own pid, not ours");
            assert_ne!(pid, raw::getpid());
        }
    }
}
