//! The agent's termination-signal handling, behind a safe wrapper.

use std::io;

/// Termination signals (SIGINT, SIGTERM, SIGHUP) blocked in the calling
/// thread and in every thread it spawns afterwards, to be received
/// synchronously with [`TerminationSignals::wait`].
///
/// Block them in `main` *before* starting any thread: a thread started
/// earlier keeps the default disposition and would be killed by the signal
/// instead, skipping the agent's cleanup (its socket file stays behind;
/// `hotpatch ps` then reports it as stale and removes it).
#[derive(Debug)]
pub struct TerminationSignals {
    set: libc::sigset_t,
}

impl TerminationSignals {
    /// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread.
    ///
    /// # Errors
    /// The OS error of `pthread_sigmask`.
    pub fn block() -> io::Result<TerminationSignals> {
        // SAFETY: an all-zero sigset_t is a valid value to pass to
        // sigemptyset, which initializes it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, writable sigset_t; the signal numbers
        // are valid.
        unsafe {
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGINT);
            libc::sigaddset(&raw mut set, libc::SIGTERM);
            libc::sigaddset(&raw mut set, libc::SIGHUP);
        }
        // SAFETY: `set` is initialized; a null old-set pointer is allowed.
        let rc =
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(TerminationSignals { set })
    }

    /// Waits for one of the blocked signals; returns its number.
    pub fn wait(&self) -> i32 {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `self.set` was initialized by `block`; `sig` is a
            // writable int.
            let rc = unsafe { libc::sigwait(&raw const self.set, &raw mut sig) };
            if rc == 0 {
                return sig;
            }
        }
    }
}
