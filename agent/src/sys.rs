//! The agent's termination-signal handling, behind a safe wrapper.

use std::io;

use hotpatch_sys::signal;

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
    /// The OS error of `pthread_sigmask` (through
    /// [`hotpatch_sys::signal::MaskGuard`]).
    pub fn block() -> io::Result<TerminationSignals> {
        let set = signal::sigset_of(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
        // The block outlives this call on purpose: threads spawned later
        // inherit it. The guard holds only the previous mask (no resource),
        // so forgetting it leaks nothing and just skips the restore.
        std::mem::forget(signal::MaskGuard::block_raw(set)?);
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
