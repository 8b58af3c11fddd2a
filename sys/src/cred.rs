//! Who is at the other end: our uid, a Unix socket peer's credentials
//! (`SO_PEERCRED`), whether a pid is running. Used by the agent (refusing
//! peers of another uid) and by its clients (trusting only our own agents).

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
