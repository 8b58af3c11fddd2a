//! Reading and writing this process's own memory without risking a fault.
//!
//! `process_vm_readv`/`process_vm_writev` on our own pid: the kernel walks
//! the page tables and answers `EFAULT` for an unmapped or unreadable
//! address, where a plain load would raise `SIGSEGV`. Used wherever the
//! address comes from a source that may be stale (a registered range, a
//! stopped thread's stack, a patch entry whose module may be gone).
//!
//! Both calls are made through [`crate::raw`]: no `errno`, no allocation, so
//! they are safe inside a stopped world, a signal handler, or the `CLONE_VM`
//! ptrace helper. `nix::sys::uio::process_vm_readv` is not used because it
//! writes `errno` (a thread-local) on failure.

use crate::raw;

fn iov(addr: usize, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    }
}

/// Copies `buf.len()` bytes at `addr` of this process into `buf`; `false`
/// (and `buf` unspecified) if any part is not mapped readable.
///
/// Async-signal-safe.
pub fn read_self(addr: usize, buf: &mut [u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    let local = iov(buf.as_mut_ptr() as usize, buf.len());
    let remote = iov(addr, buf.len());
    // SAFETY: `local` describes `buf`, which we own and may write, for the
    // whole call; the kernel validates `remote` itself and fails with
    // EFAULT instead of faulting. One iovec each side, flags 0.
    let r = unsafe {
        raw::syscall6(
            libc::SYS_process_vm_readv,
            raw::getpid() as usize,
            (&raw const local) as usize,
            1,
            (&raw const remote) as usize,
            1,
            0,
        )
    };
    r == Ok(buf.len())
}

/// `len` bytes at `addr` of this process, or `None` if any part is not
/// mapped readable. Allocates: not for a signal handler.
pub fn read_self_vec(addr: usize, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    read_self(addr, &mut buf).then_some(buf)
}

/// Writes `bytes` at `addr` of this process; `false` if any part is not
/// mapped writable (nothing is written past the first bad page).
///
/// Async-signal-safe. The kernel honours the mapping's protection: code
/// pages are not writable this way unless made writable first.
///
/// # Safety
/// `[addr, addr + bytes.len())` must be memory that no Rust reference
/// aliases while it is written (e.g. a stopped thread's stack), or the
/// write is a data race the compiler may miscompile.
pub unsafe fn write_self(addr: usize, bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return true;
    }
    let local = iov(bytes.as_ptr() as usize, bytes.len());
    let remote = iov(addr, bytes.len());
    // SAFETY: `local` describes `bytes`, only read by the kernel; `remote`
    // is validated by the kernel (EFAULT if unmapped or read-only); the
    // caller guarantees nothing aliases it.
    let r = unsafe {
        raw::syscall6(
            libc::SYS_process_vm_writev,
            raw::getpid() as usize,
            (&raw const local) as usize,
            1,
            (&raw const remote) as usize,
            1,
            0,
        )
    };
    r == Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mapped_memory_and_refuses_unmapped() {
        let data = *b"hotpatch-sys mem";
        let mut buf = [0u8; 16];
        assert!(read_self(data.as_ptr() as usize, &mut buf));
        assert_eq!(buf, data);
        assert_eq!(
            read_self_vec(data.as_ptr() as usize, 8).as_deref(),
            Some(&data[..8])
        );
        // Page 0 is never mapped; a range running off a mapping fails too.
        assert!(!read_self(8, &mut buf));
        assert!(read_self_vec(usize::MAX - 4, 4).is_none());
        let mut target = [0u8; 4];
        // SAFETY: `target` is not borrowed while written.
        assert!(unsafe { write_self(target.as_mut_ptr() as usize, b"abcd") });
        assert_eq!(&target, b"abcd");
        // SAFETY: address 8 is unmapped; nothing is aliased.
        assert!(!unsafe { write_self(8, b"x") });
        // A read-only page (this function's code) is not writable this way.
        let code = reads_mapped_memory_and_refuses_unmapped as *const () as usize;
        // SAFETY: the kernel refuses the write (EFAULT): code is r-x.
        assert!(!unsafe { write_self(code, b"\xcc") });
    }
}
