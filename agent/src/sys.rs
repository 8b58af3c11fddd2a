//! The agent's few raw system calls, behind safe wrappers.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The calling process's real uid.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Credentials of the peer of a connected Unix stream socket, as the kernel
/// recorded them at `connect` time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's pid.
    pub pid: i32,
    /// The peer's effective uid at connect time.
    pub uid: u32,
    /// The peer's effective gid at connect time.
    pub gid: u32,
}

/// `getsockopt(SO_PEERCRED)` on `stream`.
///
/// # Errors
/// The OS error of `getsockopt`.
pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY:
    // - the fd is a live socket owned by `stream`, borrowed for the call;
    // - `cred` is a writable `ucred` and `len` holds its exact size, which is
    //   what SO_PEERCRED writes (the kernel truncates to `len` otherwise).
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Whether a process with `pid` exists (`kill(pid, 0)`; a process of
/// another user counts as existing).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; kill only checks that the process
    // exists and that we may signal it.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

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
