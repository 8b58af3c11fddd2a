//! A fault reporter for test binaries that patch their own code.
//!
//! A test binary that dies of SIGSEGV/SIGBUS/SIGILL leaves only "signal:
//! 11" in cargo's output: which test, which thread, which instruction is
//! gone (the patcher_ptrace binary died so in a fresh-clone CI run of stop
//! 17, and most likely in the official run of stop 15, whose log named two
//! tests that never reported). [`install`] prints, from the handler, the
//! signal, the fault address, the thread, `rip`/`rsp`/`rbp`, up to 32
//! return addresses by frame pointers (read with `process_vm_readv`, which
//! fails instead of faulting), and `/proc/self/maps` (to place them), then
//! the process dies by the default action of the same signal.
//! Async-signal-safe: only `write`, `open`, `read`, `close`,
//! `process_vm_readv`, `gettid`, on stack buffers.

use std::sync::Once;

static INSTALLED: Once = Once::new();

/// Installs the reporter for SIGSEGV, SIGBUS and SIGILL (once per process).
/// Not SIGTRAP: the patcher's int3 protocol owns it.
pub fn install() {
    INSTALLED.call_once(|| {
        for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL] {
            // SAFETY: a zeroed sigaction is valid; the handler is a `fn`
            // item (valid for ever) and async-signal-safe (module docs);
            // SA_RESETHAND restores the default action before it runs.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = report as *const () as usize;
                // Not SA_ONSTACK: std's alternate stacks are a few KiB, too small
                // for this handler's buffers in a debug build.
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// A line being built on the stack.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
    fn s(&mut self, s: &[u8]) -> &mut Line {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }
    fn hex(&mut self, v: u64) -> &mut Line {
        self.s(b"0x");
        for i in 0..16 {
            let nib = ((v >> (60 - 4 * i)) & 0xf) as u8;
            self.s(&[if nib < 10 {
                b'0' + nib
            } else {
                b'a' + nib - 10
            }]);
        }
        self
    }
    fn dec(&mut self, v: u64) -> &mut Line {
        let mut d = [0u8; 20];
        let mut n = 0;
        let mut v = v;
        loop {
            d[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.s(&[d[n]]);
        }
        self
    }
    fn emit(&mut self) {
        self.s(b"\n");
        // SAFETY: write(2) of our stack buffer; async-signal-safe.
        unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len) };
        self.len = 0;
    }
}

/// Reads 8 bytes at `addr` of this process without faulting.
fn peek(addr: u64) -> Option<u64> {
    let mut v = 0u64;
    let local = libc::iovec {
        iov_base: (&raw mut v).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: process_vm_readv on our own pid writes at most 8 bytes into
    // `v`; an unreadable `addr` is an error return, not a fault.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == 8).then_some(v)
}

extern "C" fn report(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: SA_SIGINFO passes the interrupted context and the siginfo.
    let (rip, rsp, rbp, addr) = unsafe {
        let g = &(*uc).uc_mcontext.gregs;
        (
            g[libc::REG_RIP as usize] as u64,
            g[libc::REG_RSP as usize] as u64,
            g[libc::REG_RBP as usize] as u64,
            (*info).si_addr() as u64,
        )
    };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u64;
    let mut l = Line::new();
    l.s(b"hotpatch-tests crash reporter: signal ")
        .dec(sig as u64)
        .s(b" at address ")
        .hex(addr)
        .s(b" in thread ")
        .dec(tid)
        .emit();
    l.s(b"  rip ")
        .hex(rip)
        .s(b" rsp ")
        .hex(rsp)
        .s(b" rbp ")
        .hex(rbp)
        .emit();
    l.s(b"  [rsp] ").hex(peek(rsp).unwrap_or(0)).emit();
    let mut fp = rbp;
    for i in 0..32 {
        let (Some(next), Some(ret)) = (peek(fp), peek(fp.wrapping_add(8))) else {
            break;
        };
        l.s(b"  frame ").dec(i).s(b": return to ").hex(ret).emit();
        if next <= fp {
            break;
        }
        fp = next;
    }
    l.s(b"  /proc/self/maps:").emit();
    // SAFETY: open/read/write/close of a stack buffer; async-signal-safe.
    unsafe {
        let fd = libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY);
        if fd >= 0 {
            let mut buf = [0u8; 1024];
            let mut total = 0usize;
            while total < 256 * 1024 {
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                libc::write(2, buf.as_ptr().cast(), n as usize);
                total += n as usize;
            }
            libc::close(fd);
        }
    }
    // SA_RESETHAND restored the default action: returning re-executes the
    // faulting instruction, which now ends the process with `sig`.
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    /// A child that faults prints the report and still dies of SIGSEGV.
    #[test]
    fn a_fault_is_reported_and_still_kills() {
        if std::env::var_os("HOTPATCH_CRASH_CHILD").is_some() {
            super::install();
            // SAFETY: not safe at all, on purpose: a write to address 8
            // faults, which is what this child is for.
            unsafe { std::ptr::write_volatile(std::ptr::without_provenance_mut::<u64>(8), 1) };
            unreachable!();
        }
        let out = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "crash::tests::a_fault_is_reported_and_still_kills",
                "--exact",
                "--nocapture",
            ])
            .env("HOTPATCH_CRASH_CHILD", "1")
            .output()
            .expect("run the child");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("crash reporter: signal 11 at address 0x0000000000000008"),
            "{err}"
        );
        assert!(err.contains("  rip 0x"), "{err}");
        assert!(err.contains("/proc/self/maps:"), "{err}");
        assert!(err.contains("r-xp"), "no maps lines: {err}");
    }
}
