//! System calls by inline assembly.
//!
//! Why not `libc::syscall`: it stores a failure in `errno`, a thread-local.
//! The ptrace helper ([`crate::helper`]) is a `CLONE_VM` child that inherits
//! the creating thread's `%fs` base, so its `errno` *is* that thread's;
//! and inside a signal handler or a stopped world we want nothing but the
//! kernel call. These functions return the kernel's raw result: `>= 0` on
//! success, `-errno` on failure. They are async-signal-safe and touch no
//! memory but what the caller passes.

use core::arch::asm;

/// A raw kernel result: `Ok(value)` or `Err(errno)`.
pub type RawResult = Result<usize, i32>;

fn check(r: isize) -> RawResult {
    if (-4095..0).contains(&r) {
        Err((-r) as i32)
    } else {
        Ok(r as usize)
    }
}

/// A system call with up to six arguments.
///
/// # Safety
/// The caller must uphold the contract of system call `nr` for these
/// arguments (pointers valid for what the kernel reads or writes).
#[inline(always)]
pub unsafe fn syscall6(
    nr: i64,
    a1: usize,
    a2: usize,
    a3: usize,
    a4: usize,
    a5: usize,
    a6: usize,
) -> RawResult {
    let ret: isize;
    // SAFETY: the x86-64 Linux system call ABI: number in rax, arguments in
    // rdi, rsi, rdx, r10, r8, r9; the kernel clobbers rcx and r11 and
    // returns in rax. Memory effects are the caller's contract (above), so
    // the asm is not marked `nomem`.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            in("r8") a5,
            in("r9") a6,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    check(ret)
}

/// This thread's kernel id.
pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { syscall6(libc::SYS_gettid, 0, 0, 0, 0, 0, 0) }.unwrap_or(0) as i32
}

/// This process's id (the thread group id).
pub fn getpid() -> i32 {
    // SAFETY: getpid takes no arguments and cannot fail.
    unsafe { syscall6(libc::SYS_getpid, 0, 0, 0, 0, 0, 0) }.unwrap_or(0) as i32
}

/// The parent's process id.
pub fn getppid() -> i32 {
    // SAFETY: getppid takes no arguments and cannot fail.
    unsafe { syscall6(libc::SYS_getppid, 0, 0, 0, 0, 0, 0) }.unwrap_or(0) as i32
}

/// Sends `sig` to thread `tid` of process `pid` (`sig` 0 checks existence).
pub fn tgkill(pid: i32, tid: i32, sig: i32) -> RawResult {
    // SAFETY: tgkill only sends a signal; no memory is passed.
    unsafe {
        syscall6(
            libc::SYS_tgkill,
            pid as usize,
            tid as usize,
            sig as usize,
            0,
            0,
            0,
        )
    }
}

/// `prctl(option, arg2)`.
pub fn prctl(option: i32, arg2: usize) -> RawResult {
    // SAFETY: used only with options whose arg2 is a value, not a pointer
    // (PR_SET_PDEATHSIG, PR_SET_PTRACER, PR_GET_DUMPABLE).
    unsafe { syscall6(libc::SYS_prctl, option as usize, arg2, 0, 0, 0, 0) }
}

/// Blocks every blockable signal on the calling thread.
pub fn block_all_signals() -> RawResult {
    let all: u64 = !0;
    // SAFETY: rt_sigprocmask reads 8 bytes (the kernel sigset size) from
    // `all`, which lives on our stack; the old mask is not requested.
    unsafe {
        syscall6(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK as usize,
            &all as *const u64 as usize,
            0,
            8,
            0,
            0,
        )
    }
}

/// `exit(code)` of the calling thread only (not `exit_group`).
pub fn exit_thread(code: i32) -> ! {
    loop {
        // SAFETY: SYS_exit ends the calling task; it does not return.
        let _ = unsafe { syscall6(libc::SYS_exit, code as usize, 0, 0, 0, 0, 0) };
    }
}

/// Sleeps for `ns` nanoseconds (`nanosleep`; an interruption just returns).
pub fn sleep_ns(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: nanosleep reads `ts` from our stack; no remainder requested.
    let _ = unsafe { syscall6(libc::SYS_nanosleep, &ts as *const _ as usize, 0, 0, 0, 0, 0) };
}

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts` on our stack.
    let _ = unsafe {
        syscall6(
            libc::SYS_clock_gettime,
            libc::CLOCK_MONOTONIC as usize,
            &mut ts as *mut _ as usize,
            0,
            0,
            0,
            0,
        )
    };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `FUTEX_WAIT_PRIVATE` on `word` while it equals `expected`, for at most
/// `timeout_ns` (0 = no timeout). Spurious wakeups are the caller's loop.
pub fn futex_wait(word: &core::sync::atomic::AtomicU32, expected: u32, timeout_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    let tsp = if timeout_ns == 0 {
        0
    } else {
        &ts as *const _ as usize
    };
    // SAFETY: `word` is a live, aligned u32; the kernel only reads it and
    // `ts` (on our stack, or null).
    let _ = unsafe {
        syscall6(
            libc::SYS_futex,
            word.as_ptr() as usize,
            (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as usize,
            expected as usize,
            tsp,
            0,
            0,
        )
    };
}

/// `FUTEX_WAKE_PRIVATE` of up to `n` waiters on `word`.
pub fn futex_wake(word: &core::sync::atomic::AtomicU32, n: i32) {
    // SAFETY: `word` is a live, aligned u32 identifying the futex.
    let _ = unsafe {
        syscall6(
            libc::SYS_futex,
            word.as_ptr() as usize,
            (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as usize,
            n as usize,
            0,
            0,
            0,
        )
    };
}

/// `wait4(pid, &status, options, NULL)`: `Ok(pid)` (0 with `WNOHANG` and
/// nothing to report) and the status word.
pub fn wait4(pid: i32, options: i32) -> Result<(i32, i32), i32> {
    let mut status: i32 = 0;
    // SAFETY: wait4 writes one int into `status` on our stack; no rusage.
    let r = unsafe {
        syscall6(
            libc::SYS_wait4,
            pid as usize,
            &mut status as *mut i32 as usize,
            options as usize,
            0,
            0,
            0,
        )
    }?;
    Ok((r as i32, status))
}
