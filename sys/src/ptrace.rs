//! ptrace for stopping threads of our own process (through a [`crate::helper`])
//! and, later, other processes (`hotpatch attach`).
//!
//! The operations are raw system calls ([`crate::raw`]): they run in the
//! `CLONE_VM` helper, where `nix`'s wrappers would write `errno` into the
//! creating thread's TLS. [`permission`] runs with the world running and is
//! built on `nix` and `std`.

use crate::raw::{self, RawResult};

/// `user_regs_struct` (x86-64), as `PTRACE_GETREGS` fills it.
pub type Regs = libc::user_regs_struct;

/// A zeroed register set.
pub fn zeroed_regs() -> Regs {
    // SAFETY: user_regs_struct is plain integers; all-zero is valid.
    unsafe { core::mem::zeroed() }
}

fn call(req: u32, tid: i32, addr: usize, data: usize) -> RawResult {
    // SAFETY: every request used here (SEIZE, INTERRUPT, GETREGS, SETREGS,
    // DETACH) either takes values or a pointer to a `Regs` the caller owns
    // (checked by the typed wrappers below).
    unsafe {
        raw::syscall6(
            libc::SYS_ptrace,
            req as usize,
            tid as usize,
            addr,
            data,
            0,
            0,
        )
    }
}

/// `PTRACE_SEIZE` without options: the tracee keeps running; no
/// `PTRACE_O_EXITKILL` (if the tracer dies, the tracee must live on).
pub fn seize(tid: i32) -> Result<(), i32> {
    call(libc::PTRACE_SEIZE, tid, 0, 0).map(drop)
}

/// `PTRACE_INTERRUPT`: the seized tracee enters a ptrace-stop at the next
/// return to user space (a blocking system call is interrupted and will be
/// restarted on resume).
pub fn interrupt(tid: i32) -> Result<(), i32> {
    call(libc::PTRACE_INTERRUPT, tid, 0, 0).map(drop)
}

/// `PTRACE_GETREGS` of a stopped tracee.
pub fn getregs(tid: i32, regs: &mut Regs) -> Result<(), i32> {
    call(libc::PTRACE_GETREGS, tid, 0, regs as *mut Regs as usize).map(drop)
}

/// `PTRACE_SETREGS` of a stopped tracee.
pub fn setregs(tid: i32, regs: &Regs) -> Result<(), i32> {
    call(libc::PTRACE_SETREGS, tid, 0, regs as *const Regs as usize).map(drop)
}

/// `PTRACE_DETACH` of a stopped tracee, delivering `sig` (0 for none).
pub fn detach(tid: i32, sig: i32) -> Result<(), i32> {
    call(libc::PTRACE_DETACH, tid, 0, sig as usize).map(drop)
}

/// What waiting for a tracee found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Nothing yet (`WNOHANG`).
    NotYet,
    /// In a ptrace-stop. `signal` must be passed to [`detach`] so that it is
    /// not lost: non-zero for a signal-delivery-stop, 0 for the stop our
    /// `PTRACE_INTERRUPT` or a group-stop caused.
    Stopped {
        /// The signal to re-inject at detach.
        signal: i32,
    },
    /// The thread exited (or was killed).
    Gone,
}

/// `PTRACE_EVENT_STOP` (linux/ptrace.h).
#[cfg(test)]
const PTRACE_EVENT_STOP: i32 = 128;

/// Decodes a `wait4` status word of a seized tracee.
pub fn decode(status: i32) -> Wait {
    if status & 0xff == 0x7f {
        let sig = (status >> 8) & 0xff;
        let event = (status >> 16) & 0xff;
        if event != 0 {
            // PTRACE_EVENT_STOP (interrupt- or group-stop), or another
            // event: nothing to re-inject.
            Wait::Stopped { signal: 0 }
        } else {
            Wait::Stopped { signal: sig }
        }
    } else {
        Wait::Gone
    }
}

/// `wait4(tid, __WALL [| WNOHANG])` for one tracee.
pub fn wait(tid: i32, hang: bool) -> Result<Wait, i32> {
    let opts = libc::__WALL | if hang { 0 } else { libc::WNOHANG };
    loop {
        match raw::wait4(tid, opts) {
            Ok((0, _)) => return Ok(Wait::NotYet),
            Ok((_, status)) => return Ok(decode(status)),
            Err(libc::EINTR) => continue,
            Err(libc::ECHILD) => return Ok(Wait::Gone),
            Err(e) => return Err(e),
        }
    }
}

/// `CAP_SYS_PTRACE` (linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;

/// What decides whether a helper of this process may trace its threads.
/// Read with the world running (allocates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// `kernel.yama.ptrace_scope`, `None` when Yama is not present.
    pub yama_scope: Option<u32>,
    /// `prctl(PR_GET_DUMPABLE)` is 1.
    pub dumpable: bool,
    /// `CAP_SYS_PTRACE` is in the effective set.
    pub cap_sys_ptrace: bool,
    /// `Seccomp:` of the process (2 = a filter, which may deny ptrace).
    pub seccomp: u32,
}

/// Why a thread cannot be stopped with ptrace, and what would allow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// What forbids it.
    pub reason: String,
    /// What would allow it.
    pub fix: String,
}

/// Reads the process's ptrace-relevant state, as seen by a helper the
/// calling thread would start.
pub fn permission() -> Permission {
    let yama_scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let dumpable = nix::sys::prctl::get_dumpable().unwrap_or(true);
    // Capabilities are per thread: the helper inherits the creating
    // thread's, so read this thread's (`thread-self`), not the leader's.
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let value = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    };
    let cap_eff = value("CapEff:")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0);
    let seccomp = value("Seccomp:").and_then(|v| v.parse().ok()).unwrap_or(0);
    Permission {
        yama_scope,
        dumpable,
        cap_sys_ptrace: cap_eff & (1 << CAP_SYS_PTRACE) != 0,
        seccomp,
    }
}

impl Permission {
    /// Whether a helper may trace a thread whose `TracerPid` is
    /// `tracer_pid`: `Err` with the reason and the fix when it certainly
    /// may not. A seccomp filter is not judged here (only trying tells);
    /// see [`Permission::explain_errno`].
    pub fn check(&self, tracer_pid: i32) -> Result<(), Denial> {
        if tracer_pid != 0 {
            return Err(Denial {
                reason: format!("it is already traced by pid {tracer_pid} (a debugger or tracer)"),
                fix: format!("detach pid {tracer_pid} from the process"),
            });
        }
        match self.yama_scope {
            Some(3) => {
                return Err(Denial {
                    reason: "kernel.yama.ptrace_scope is 3 (no ptrace attach at all)".into(),
                    fix: "a reboot with kernel.yama.ptrace_scope <= 1 (3 cannot be lowered at run time)".into(),
                });
            }
            Some(2) if !self.cap_sys_ptrace => {
                return Err(Denial {
                    reason: "kernel.yama.ptrace_scope is 2 (admin only) and the process lacks CAP_SYS_PTRACE".into(),
                    fix: "`sysctl kernel.yama.ptrace_scope=1`, or CAP_SYS_PTRACE for the process".into(),
                });
            }
            _ => {}
        }
        if !self.dumpable && !self.cap_sys_ptrace {
            return Err(Denial {
                reason: "the process is not dumpable (prctl(PR_SET_DUMPABLE, 0), or a setuid/setcap program) and lacks CAP_SYS_PTRACE".into(),
                fix: "prctl(PR_SET_DUMPABLE, 1) in the process, or CAP_SYS_PTRACE for it".into(),
            });
        }
        Ok(())
    }

    /// Explains a `PTRACE_SEIZE` failure (`errno`) by this state.
    pub fn explain_errno(&self, errno: i32, tracer_pid: i32) -> Denial {
        if let Err(d) = self.check(tracer_pid) {
            return d;
        }
        let err = std::io::Error::from_raw_os_error(errno);
        if self.seccomp == 2
            && (errno == libc::EPERM || errno == libc::EACCES || errno == libc::ENOSYS)
        {
            return Denial {
                reason: format!("PTRACE_SEIZE failed ({err}) under a seccomp filter (Seccomp: 2)"),
                fix: "allow ptrace(PTRACE_SEIZE/INTERRUPT/GETREGS/SETREGS/DETACH) in the seccomp filter".into(),
            };
        }
        Denial {
            reason: format!("PTRACE_SEIZE failed: {err}"),
            fix: "a process that may trace its own threads (same uid, dumpable, no Yama scope >= 2, no seccomp filter denying ptrace)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_wait_statuses() {
        // Interrupt-stop: SIGTRAP | PTRACE_EVENT_STOP << 8, as the kernel reports.
        assert_eq!(
            decode((PTRACE_EVENT_STOP << 16) | (libc::SIGTRAP << 8) | 0x7f),
            Wait::Stopped { signal: 0 }
        );
        // Signal-delivery-stop of SIGUSR1: re-injected at detach.
        assert_eq!(
            decode((libc::SIGUSR1 << 8) | 0x7f),
            Wait::Stopped {
                signal: libc::SIGUSR1
            }
        );
        // Exited with status 0.
        assert_eq!(decode(0), Wait::Gone);
    }

    #[test]
    fn permission_reasons() {
        let ok = Permission {
            yama_scope: None,
            dumpable: true,
            cap_sys_ptrace: false,
            seccomp: 0,
        };
        assert!(ok.check(0).is_ok());
        assert!(ok.check(77).expect_err("denied").reason.contains("pid 77"));
        let y3 = Permission {
            yama_scope: Some(3),
            ..ok.clone()
        };
        assert!(
            y3.check(0)
                .expect_err("denied")
                .reason
                .contains("ptrace_scope is 3")
        );
        let y2 = Permission {
            yama_scope: Some(2),
            ..ok.clone()
        };
        assert!(y2.check(0).is_err());
        assert!(
            Permission {
                cap_sys_ptrace: true,
                ..y2
            }
            .check(0)
            .is_ok()
        );
        let nd = Permission {
            dumpable: false,
            ..ok.clone()
        };
        assert!(
            nd.check(0)
                .expect_err("denied")
                .fix
                .contains("PR_SET_DUMPABLE")
        );
        let sc = Permission { seccomp: 2, ..ok };
        assert!(sc.explain_errno(libc::EPERM, 0).reason.contains("seccomp"));
    }
}
