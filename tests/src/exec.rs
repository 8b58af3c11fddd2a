//! Executable memory for assembled test functions.

use iced_x86::code_asm::CodeAssembler;

/// An anonymous mapping holding assembled code, `r-x` once built.
#[derive(Debug)]
pub struct ExecMem {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only
// unmapped in Drop.
unsafe impl Send for ExecMem {}
// SAFETY: as above; shared access only reads (or executes) it.
unsafe impl Sync for ExecMem {}

impl ExecMem {
    /// Maps `pages` pages read-write.
    pub fn new(pages: usize) -> ExecMem {
        let len = pages * 4096;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        // Fill with int3 so a stray jump traps instead of sliding.
        // SAFETY: the mapping is ours, writable, `len` bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0xCC, len) };
        ExecMem {
            base: p.cast(),
            len,
        }
    }

    /// Start address.
    pub fn base(&self) -> usize {
        self.base as usize
    }

    /// Assembles `asm` to run at `base + offset`, copies it there and returns
    /// that address. Call before [`ExecMem::seal`].
    pub fn put(&mut self, offset: usize, asm: &mut CodeAssembler) -> usize {
        let at = self.base() + offset;
        let bytes = asm.assemble(at as u64).expect("assemble");
        assert!(offset + bytes.len() <= self.len, "code does not fit");
        // SAFETY: in bounds (checked) of our writable mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(offset), bytes.len())
        };
        at
    }

    /// Copies raw bytes to `base + offset`.
    pub fn put_bytes(&mut self, offset: usize, bytes: &[u8]) -> usize {
        assert!(offset + bytes.len() <= self.len, "code does not fit");
        // SAFETY: in bounds (checked) of our writable mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(offset), bytes.len())
        };
        self.base() + offset
    }

    /// Makes the memory `r-x`.
    pub fn seal(&self) {
        // SAFETY: our mapping, page aligned, `len` bytes.
        let rc = unsafe {
            libc::mprotect(
                self.base.cast(),
                self.len,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        assert_eq!(rc, 0, "mprotect");
    }

    /// The bytes at `addr .. addr+n` (must be inside).
    pub fn bytes(&self, addr: usize, n: usize) -> Vec<u8> {
        assert!(addr >= self.base() && addr + n <= self.base() + self.len);
        // SAFETY: in bounds of our readable mapping.
        unsafe { std::slice::from_raw_parts(addr as *const u8, n).to_vec() }
    }
}

impl Drop for ExecMem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; tests drop it only after every
        // site on it was removed and no thread runs it.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A `extern "C" fn(u64) -> u64` at `addr`.
///
/// # Safety
/// `addr` must hold a function of that signature for as long as it is called.
pub unsafe fn as_fn(addr: usize) -> extern "C" fn(u64) -> u64 {
    // SAFETY: per the caller.
    unsafe { std::mem::transmute::<usize, extern "C" fn(u64) -> u64>(addr) }
}

/// The `/proc/self/maps` lines covering `[addr, addr+len)`, as text.
pub fn maps_lines(addr: usize, len: usize) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/maps").expect("maps");
    text.lines()
        .filter(|l| {
            let r = l.split(' ').next().unwrap_or("");
            let (s, e) = r.split_once('-').unwrap_or(("0", "0"));
            let s = usize::from_str_radix(s, 16).unwrap_or(0);
            let e = usize::from_str_radix(e, 16).unwrap_or(0);
            s < addr + len && e > addr
        })
        .map(|l| {
            l.split_ascii_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Panics when any mapping of the process is writable and executable.
pub fn assert_no_wx(context: &str) {
    let text = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let wx: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.split_ascii_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("rwx"))
        })
        .collect();
    assert!(wx.is_empty(), "W+X mapping after {context}: {wx:?}");
}
