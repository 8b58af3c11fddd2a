//! Copying the top of a thread's stack from inside a signal handler.
//!
//! The profiler's SIGPROF handler copies the interrupted thread's registers
//! and the bytes above its stack pointer, and the session's helper thread
//! unwinds the copy later (as the kernel does for a perf sample with
//! `PERF_SAMPLE_STACK_USER`). How far the stack goes up is not known in the
//! handler: a shallow thread's stack mapping may end a few hundred bytes
//! above the stack pointer, and a plain load past it faults. So the copy is
//! `process_vm_readv` on our own pid, which stops at the first unreadable
//! page and reports how much it copied. That page is not necessarily the
//! end of the stack's mapping: when a readable mapping follows the stack
//! directly (a thread stack placed below other memory), the copy goes on
//! into it, up to the buffer's length. Those bytes are only read (the
//! unwinder treats them as stack contents; an unwind that reaches them
//! ends on an address no module holds), never written.

use crate::raw;

/// Copies as much of `[addr, addr + buf.len())` of this process as is
/// mapped readable from `addr` on into `buf`; returns the number of bytes
/// copied (0 if `addr` itself is unreadable). The copy ends at the first
/// page that cannot be read: the remote side is split at page boundaries so
/// that a partial copy stops exactly there.
///
/// Async-signal-safe: one raw system call, no `errno`, no allocation, and a
/// fixed array of at most [`MAX_PIECES`] iovecs on the stack.
pub fn read_self_prefix(addr: usize, buf: &mut [u8]) -> usize {
    const PAGE: usize = 4096;
    if buf.is_empty() {
        return 0;
    }
    let mut remote = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_PIECES];
    let mut n = 0;
    let mut at = addr;
    let end = addr.saturating_add(buf.len());
    while at < end && n < MAX_PIECES {
        let next = ((at / PAGE) + 1).saturating_mul(PAGE).min(end);
        remote[n] = libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: next - at,
        };
        n += 1;
        at = next;
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: at - addr,
    };
    // SAFETY: `local` describes the first `at - addr <= buf.len()` bytes of
    // `buf`, which we own and may write for the whole call; the kernel
    // validates the remote ranges itself (EFAULT or a short count instead of
    // a fault). `n` iovecs of `remote` are initialized; flags 0.
    let r = unsafe {
        raw::syscall6(
            libc::SYS_process_vm_readv,
            raw::getpid() as usize,
            (&raw const local) as usize,
            1,
            remote.as_ptr() as usize,
            n,
            0,
        )
    };
    r.unwrap_or(0)
}

/// The most pages [`read_self_prefix`] copies in one call (64 KiB).
pub const MAX_PIECES: usize = 17;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_stops_at_the_first_unmapped_page() {
        // SAFETY: a fresh anonymous mapping of 3 pages; the third is
        // unmapped again below, the rest is released at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as usize;
        // SAFETY: within our mapping.
        unsafe {
            std::ptr::write_bytes(base as *mut u8, 0xab, 2 * 4096);
            assert_eq!(
                libc::munmap((base + 2 * 4096) as *mut libc::c_void, 4096),
                0
            );
        }
        let mut buf = vec![0u8; 8192];
        // From 100 bytes below the end of the readable part: 100 bytes.
        assert_eq!(read_self_prefix(base + 2 * 4096 - 100, &mut buf), 100);
        assert!(buf[..100].iter().all(|&b| b == 0xab));
        // From the start: both pages, not more.
        assert_eq!(read_self_prefix(base + 5, &mut buf), 2 * 4096 - 5);
        // Unreadable start.
        assert_eq!(read_self_prefix(base + 2 * 4096, &mut buf), 0);
        // Short buffer inside one page.
        assert_eq!(read_self_prefix(base + 10, &mut buf[..16]), 16);
        // SAFETY: our own two remaining pages.
        unsafe { libc::munmap(base as *mut libc::c_void, 2 * 4096) };
    }
}
