//! Another process, seen and traced from outside (`hotpatch attach`): its
//! `/proc/<pid>` facts (status fields, threads, mappings) and ptrace of one
//! of its threads from a normal (world-running) tracer, built on `nix`.
//!
//! Unlike [`crate::ptrace`], nothing here runs in a stopped world or a
//! `CLONE_VM` helper: the caller is an ordinary process (the CLI), so the
//! typed `nix` wrappers (which write our own `errno`) are fine.

use std::io;
use std::path::PathBuf;

use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// A field of `/proc/<pid>/status` (`key` without the colon), trimmed.
///
/// # Errors
/// The OS error of reading the file (`NotFound` when the process is gone).
pub fn status_field(pid: i32, key: &str) -> io::Result<Option<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim().to_string())
    }))
}

/// A numeric field of `/proc/<pid>/status`: the first number of its value
/// (`Uid:` gives the real uid), parsed in `radix`.
///
/// # Errors
/// As [`status_field`]; `InvalidData` when the field is missing or not a
/// number.
pub fn status_number(pid: i32, key: &str, radix: u32) -> io::Result<u64> {
    let v = status_field(pid, key)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no {key}: field")))?;
    let first = v.split_whitespace().next().unwrap_or("");
    u64::from_str_radix(first, radix)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{key}: {v:?}")))
}

/// The thread ids of process `pid` (`/proc/<pid>/task`), sorted.
///
/// # Errors
/// The OS error of reading the directory.
pub fn tasks(pid: i32) -> io::Result<Vec<i32>> {
    let mut out: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// One line of `/proc/<pid>/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `rwxp` flags as the kernel prints them.
    pub perms: String,
    /// File offset of `start`.
    pub offset: u64,
    /// The mapped file (or `[stack]`, `[vdso]`, ...; empty for anonymous).
    pub path: String,
}

impl Mapping {
    /// Whether it is executable.
    pub fn exec(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }

    /// Whether it is a private (copy-on-write) mapping, as the dynamic
    /// loader makes.
    pub fn private(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b'p')
    }

    /// Whether it maps a file by absolute path.
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/')
    }
}

/// Parses the text of a `maps` file (lines that do not parse are skipped).
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(6, ' ');
            let range = it.next()?;
            let perms = it.next()?;
            let offset = it.next()?;
            let _dev = it.next()?;
            let _inode = it.next()?;
            let path = it.next().unwrap_or("").trim_start().to_string();
            let (s, e) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms: perms.to_string(),
                offset: u64::from_str_radix(offset, 16).ok()?,
                path,
            })
        })
        .collect()
}

/// The mappings of process `pid`.
///
/// # Errors
/// The OS error of reading `/proc/<pid>/maps`.
pub fn maps(pid: i32) -> io::Result<Vec<Mapping>> {
    Ok(parse_maps(&std::fs::read_to_string(format!(
        "/proc/{pid}/maps"
    ))?))
}

/// The load base of `path` in `maps`: the start of its private mapping of
/// file offset 0 (the first `PT_LOAD`, as the dynamic loader maps it), if
/// loaded. Shared mappings (`r--s`: a symbolizer reading the file) are not
/// loads and are skipped.
pub fn load_base(maps: &[Mapping], path: &str) -> Option<u64> {
    maps.iter()
        .filter(|m| m.path == path && m.offset == 0 && m.private())
        .map(|m| m.start)
        .min()
}

/// The open file descriptors of `pid` and what they point to, sorted.
///
/// # Errors
/// The OS error of reading `/proc/<pid>/fd`.
pub fn fds(pid: i32) -> io::Result<Vec<(i32, PathBuf)>> {
    let mut out: Vec<(i32, PathBuf)> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, std::fs::read_link(e.path()).unwrap_or_default()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `NT_X86_XSTATE` (elf.h).
const NT_X86_XSTATE: i32 = 0x202;
/// Room for the largest XSAVE area (AVX-512 and AMX included).
const XSTATE_MAX: usize = 16 * 1024;

/// A thread of another process, seized with `PTRACE_SEIZE` (no options:
/// if the tracer dies, the tracee lives on). Detached on drop (best
/// effort) if [`Tracee::detach`] was not called.
#[derive(Debug)]
pub struct Tracee {
    tid: Pid,
    attached: bool,
}

/// How waiting for a seized thread ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A group- or interrupt-stop (`PTRACE_EVENT_STOP`): nothing to re-inject.
    Event,
    /// A signal-delivery-stop: `signal` must be re-injected (or suppressed on
    /// purpose) when resuming.
    Signal(i32),
    /// It exited or was killed.
    Gone,
}

impl Tracee {
    /// `PTRACE_SEIZE` of thread `tid`.
    ///
    /// # Errors
    /// The `errno` of `ptrace` (`EPERM`: not allowed; `ESRCH`: gone).
    pub fn seize(tid: i32) -> Result<Tracee, i32> {
        ptrace::seize(Pid::from_raw(tid), ptrace::Options::empty()).map_err(|e| e as i32)?;
        Ok(Tracee {
            tid: Pid::from_raw(tid),
            attached: true,
        })
    }

    /// The thread id.
    pub fn tid(&self) -> i32 {
        self.tid.as_raw()
    }

    /// `PTRACE_INTERRUPT`: stop at the next return to user space.
    ///
    /// # Errors
    /// The `errno` of `ptrace`.
    pub fn interrupt(&self) -> Result<(), i32> {
        ptrace::interrupt(self.tid).map_err(|e| e as i32)
    }

    /// Waits (blocking) for the next stop of this thread.
    ///
    /// # Errors
    /// The `errno` of `waitpid`.
    pub fn wait(&self) -> Result<Stop, i32> {
        loop {
            match waitpid(self.tid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::PtraceEvent(_, _, _)) => return Ok(Stop::Event),
                Ok(WaitStatus::Stopped(_, sig)) => return Ok(Stop::Signal(sig as i32)),
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                    return Ok(Stop::Gone);
                }
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::ECHILD) => return Ok(Stop::Gone),
                Err(e) => return Err(e as i32),
            }
        }
    }

    /// The registers of the stopped thread.
    ///
    /// # Errors
    /// The `errno` of `ptrace`.
    pub fn regs(&self) -> Result<crate::ptrace::Regs, i32> {
        ptrace::getregs(self.tid).map_err(|e| e as i32)
    }

    /// Sets the registers of the stopped thread.
    ///
    /// # Errors
    /// The `errno` of `ptrace`.
    pub fn set_regs(&self, regs: &crate::ptrace::Regs) -> Result<(), i32> {
        ptrace::setregs(self.tid, *regs).map_err(|e| e as i32)
    }

    /// The stopped thread's extended FPU state (`NT_X86_XSTATE`: x87, SSE,
    /// AVX, ...), as `PTRACE_GETREGSET` gives it.
    ///
    /// # Errors
    /// The `errno` of `ptrace`.
    pub fn xstate(&self) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; XSTATE_MAX];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: PTRACE_GETREGSET writes at most `iov_len` bytes into
        // `buf` (owned, alive for the call) and updates `iov_len` to the
        // size written.
        let rc = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGSET,
                self.tid.as_raw(),
                NT_X86_XSTATE as usize,
                &raw mut iov,
            )
        };
        if rc != 0 {
            return Err(nix::errno::Errno::last_raw());
        }
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    /// Puts back a state read with [`Tracee::xstate`].
    ///
    /// # Errors
    /// The `errno` of `ptrace`.
    pub fn set_xstate(&self, state: &[u8]) -> Result<(), i32> {
        let mut buf = state.to_vec();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: PTRACE_SETREGSET reads `iov_len` bytes from `buf` (owned,
        // alive for the call).
        let rc = unsafe {
            libc::ptrace(
                libc::PTRACE_SETREGSET,
                self.tid.as_raw(),
                NT_X86_XSTATE as usize,
                &raw mut iov,
            )
        };
        if rc != 0 {
            return Err(nix::errno::Errno::last_raw());
        }
        Ok(())
    }

    /// Reads `len` bytes at `addr` of the stopped thread's memory.
    ///
    /// # Errors
    /// The `errno` of `PTRACE_PEEKDATA` (`EIO`/`EFAULT`: unmapped).
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, i32> {
        let mut out = Vec::with_capacity(len + 8);
        let mut a = addr;
        while out.len() < len {
            let w = ptrace::read(self.tid, a as ptrace::AddressType).map_err(|e| e as i32)?;
            out.extend_from_slice(&w.to_ne_bytes());
            a += 8;
        }
        out.truncate(len);
        Ok(out)
    }

    /// Writes `bytes` at `addr` of the stopped thread's memory (words; the
    /// bytes of the last word past `bytes` are preserved).
    ///
    /// # Errors
    /// The `errno` of `PTRACE_PEEKDATA`/`POKEDATA`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), i32> {
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let a = addr + 8 * i as u64;
            let mut word = [0u8; 8];
            if chunk.len() < 8 {
                word.copy_from_slice(&self.read(a, 8)?);
            }
            word[..chunk.len()].copy_from_slice(chunk);
            // Word-sized write at `a` of the tracee (not of our memory).
            ptrace::write(
                self.tid,
                a as ptrace::AddressType,
                i64::from_ne_bytes(word) as libc::c_long,
            )
            .map_err(|e| e as i32)?;
        }
        Ok(())
    }

    /// `PTRACE_CONT`, delivering `sig` (0 for none).
    ///
    /// # Errors
    /// The `errno` of `ptrace`.
    pub fn cont(&self, sig: i32) -> Result<(), i32> {
        let sig = Signal::try_from(sig).ok();
        ptrace::cont(self.tid, sig).map_err(|e| e as i32)
    }

    /// `PTRACE_DETACH` of the stopped thread, delivering `sig` (0 for none).
    ///
    /// # Errors
    /// The `errno` of `ptrace`.
    pub fn detach(mut self, sig: i32) -> Result<(), i32> {
        self.attached = false;
        let sig = Signal::try_from(sig).ok();
        ptrace::detach(self.tid, sig).map_err(|e| e as i32)
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.attached {
            // A seized thread that is running cannot be detached: stop it
            // first (PTRACE_DETACH needs a ptrace-stop).
            if ptrace::interrupt(self.tid).is_ok() {
                let _ = waitpid(self.tid, Some(WaitPidFlag::__WALL));
            }
            let _ = ptrace::detach(self.tid, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let m = parse_maps(
            "7f00-7f10 r-xp 00001000 08:01 42  /usr/lib/libc.so.6\n\
             7f10-7f20 rw-p 00000000 00:00 0 \nbad line\n",
        );
        assert_eq!(m.len(), 2);
        assert!(m[0].exec() && m[0].is_file());
        assert_eq!(m[0].offset, 0x1000);
        assert_eq!(m[0].path, "/usr/lib/libc.so.6");
        assert_eq!(m[1].path, "");
        assert_eq!(load_base(&m, "/usr/lib/libc.so.6"), None);
        let m = parse_maps(
            "1000-2000 r--s 00000000 08:01 42 /x.so\n3000-4000 r--p 00000000 08:01 42 /x.so\n",
        );
        assert_eq!(
            load_base(&m, "/x.so"),
            Some(0x3000),
            "the shared map is no load"
        );
    }

    #[test]
    fn reads_own_status() {
        let me = std::process::id() as i32;
        let uid = status_number(me, "Uid", 10).expect("Uid");
        // SAFETY: getuid has no preconditions.
        assert_eq!(uid, u64::from(unsafe { libc::getuid() }));
        assert!(tasks(me).expect("tasks").contains(&me));
        assert!(!fds(me).expect("fds").is_empty());
    }
}
