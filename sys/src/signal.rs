//! Signal dispositions and masks, for code that runs with the world
//! running (never inside a signal handler).
//!
//! - [`MaskGuard`]: blocks a set of signals on this thread for a scope and
//!   restores the previous mask on drop, built on `nix`'s `SigSet`.
//! - [`query_action`] / [`swap_action`]: read and replace a disposition by
//!   signal *number*. `nix::sys::signal::sigaction` takes a `Signal`, an
//!   enum of the standard signals only, so it cannot name the real-time
//!   signal the patcher stops threads with (`SIGRTMIN + n`), and it has no
//!   query-only form (a new action must be passed); the patcher must read
//!   the old SIGTRAP disposition *before* installing its own so its handler
//!   can always chain to it. For standard signals with a handler of our
//!   own, callers use `nix::sys::signal::sigaction` directly.
//!
//! Inside a signal handler none of this is used: there a raw, argued call
//! (`sys::raw`, or libc's async-signal-safe `sigaction`/`raise`) stays.

use std::io;

use nix::sys::signal::{SigSet, SigmaskHow};

/// Blocks signals on the calling thread until dropped, then restores the
/// mask the thread had.
#[derive(Debug)]
#[must_use = "the mask is restored when the guard is dropped"]
pub struct MaskGuard {
    old: SigSet,
}

impl MaskGuard {
    /// Adds `set` to this thread's blocked signals.
    ///
    /// # Errors
    /// The OS error of `pthread_sigmask` (only `EINVAL`, not expected).
    pub fn block(set: &SigSet) -> io::Result<MaskGuard> {
        let old = set
            .thread_swap_mask(SigmaskHow::SIG_BLOCK)
            .map_err(io::Error::from)?;
        Ok(MaskGuard { old })
    }

    /// Adds `set` (a raw set, e.g. from [`sigset_of`] or one holding
    /// real-time signals) to this thread's blocked signals.
    ///
    /// # Errors
    /// As [`MaskGuard::block`].
    pub fn block_raw(set: libc::sigset_t) -> io::Result<MaskGuard> {
        // SAFETY: every bit pattern of a `sigset_t` is a valid set (it is
        // plain bits), and `set` is an initialized value.
        let set = unsafe { SigSet::from_sigset_t_unchecked(set) };
        MaskGuard::block(&set)
    }

    /// Blocks every signal the kernel lets a thread block.
    ///
    /// # Errors
    /// As [`MaskGuard::block`].
    pub fn block_all() -> io::Result<MaskGuard> {
        MaskGuard::block(&SigSet::all())
    }

    /// The mask the thread had before the guard.
    pub fn previous(&self) -> &SigSet {
        &self.old
    }
}

impl Drop for MaskGuard {
    fn drop(&mut self) {
        // Restoring a mask we read from the kernel cannot fail.
        let _ = self.old.thread_set_mask();
    }
}

/// A signal set holding exactly the signal numbers in `sigs` (real-time
/// ones included, which `nix`'s `SigSet::add` cannot name).
pub fn sigset_of(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it and
    // sigaddset edits it in place (an invalid number is ignored: EINVAL).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// The current disposition of signal `sig`.
///
/// # Errors
/// `EINVAL` when `sig` is not a signal number.
pub fn query_action(sig: i32) -> io::Result<libc::sigaction> {
    // SAFETY: a zeroed sigaction is valid plain data; with a null new
    // action, sigaction only writes the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(old)
    }
}

/// Installs `act` for signal `sig` and returns the previous disposition.
///
/// # Errors
/// `EINVAL` when `sig` is not a signal number or cannot be caught.
///
/// # Safety
/// `act.sa_sigaction` must be `SIG_DFL`, `SIG_IGN` or a function that is
/// async-signal-safe, of the signature its `SA_SIGINFO` flag says, and
/// valid for as long as the disposition stays installed.
pub unsafe fn swap_action(sig: i32, act: &libc::sigaction) -> io::Result<libc::sigaction> {
    // SAFETY: `act` is a valid sigaction (the caller vouches for its
    // handler); `old` is owned plain data the kernel fills.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, act, &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn mask_guard_blocks_and_restores() {
        let before = SigSet::thread_get_mask().expect("mask");
        assert!(
            !before.contains(Signal::SIGUSR2),
            "test thread starts unblocked"
        );
        {
            let mut set = SigSet::empty();
            set.add(Signal::SIGUSR2);
            let g = MaskGuard::block(&set).expect("block");
            assert!(!g.previous().contains(Signal::SIGUSR2));
            let now = SigSet::thread_get_mask().expect("mask");
            assert!(now.contains(Signal::SIGUSR2));
        }
        let after = SigSet::thread_get_mask().expect("mask");
        assert!(!after.contains(Signal::SIGUSR2));
        {
            let _g = MaskGuard::block_all().expect("block all");
            let now = SigSet::thread_get_mask().expect("mask");
            assert!(now.contains(Signal::SIGTERM) && now.contains(Signal::SIGINT));
        }
        assert!(
            !SigSet::thread_get_mask()
                .expect("mask")
                .contains(Signal::SIGTERM)
        );
    }

    #[test]
    fn swap_and_query_a_realtime_signal() {
        extern "C" fn h(_: i32) {}
        let sig = libc::SIGRTMAX() - 1;
        // SAFETY: zeroed is a valid sigaction; `h` does nothing.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = h as *const () as usize;
        // SAFETY: `h` is async-signal-safe (empty) and lives forever.
        let old = unsafe { swap_action(sig, &act) }.expect("install");
        assert_eq!(
            query_action(sig).expect("query").sa_sigaction,
            act.sa_sigaction
        );
        // SAFETY: restoring what was there.
        unsafe { swap_action(sig, &old) }.expect("restore");
        assert_eq!(
            query_action(sig).expect("query").sa_sigaction,
            old.sa_sigaction
        );
        assert!(query_action(0).is_err());
        let set = sigset_of(&[sig, libc::SIGUSR1]);
        {
            let _g = MaskGuard::block_raw(set).expect("block");
            // SAFETY: sigset_t is plain data.
            let mut now: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: reads this thread's mask into `now`.
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut now) };
            // SAFETY: `now` is an initialized sigset.
            assert_eq!(unsafe { libc::sigismember(&now, sig) }, 1);
        }
        // SAFETY: `set` is an initialized sigset.
        unsafe {
            assert_eq!(libc::sigismember(&set, sig), 1);
            assert_eq!(libc::sigismember(&set, libc::SIGUSR2), 0);
        }
    }
}
