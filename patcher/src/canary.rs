//! Canary dispatch stubs: one call in N to a replacement, the rest to the
//! current code, decided without a lock, an allocation or a thread-local.
//!
//! A site's slot points at the stub (see `site.rs` for the slot); the stub
//! keeps every argument register and ends in a `jmp` to one of the two
//! destinations, so the callee sees the caller's frame exactly:
//!
//! ```text
//! code page (r-x)                          data page (rw-)
//! endbr64                                  +0  ctr      u32 (Weyl counter)
//! push rax                                 +8  current  u64
//! mov  eax, 0x9E3779B9                     +16 canary   u64
//! lock xadd dword [rip+ctr], eax   ; eax = previous counter
//! cmp  eax, THRESH                 ; THRESH = ceil(M * 2^32 / N)
//! pop  rax                         ; flags survive pop
//! jb   1f
//! jmp  qword [rip+current]         ; N-M in N: the current code
//! 1: jmp qword [rip+canary]        ; M in N: the replacement
//! ```
//!
//! The counter walks the Weyl sequence `k * 0x9E3779B9 mod 2^32` (the step
//! is odd, so the sequence visits every value once per 2^32 calls, and the
//! golden-ratio step spreads consecutive values evenly): call `k` goes to
//! the replacement exactly when `k * step mod 2^32 < THRESH`, so over any
//! run of calls the share is `M/N` within a few calls, and single-threaded
//! it is exactly computable ([`Ratio::canary_calls`]).
//!
//! Stubs are never freed (2 pages each, a canary is a rare event): a thread
//! may be inside one at any time after the slot stopped pointing at it, and
//! keeping them is simpler than proving it left. Promotion and rollback are
//! stores to the site's slot (`Site::swap` / `Site::disable`), never to the
//! stub.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use hotpatch_symbolizer::RuntimeAddr;

use crate::error::{Error, Result};

/// The Weyl step: `2^32 / golden ratio`, odd.
pub const WEYL_STEP: u32 = 0x9E37_79B9;

/// Largest denominator of a [`Ratio`].
pub const MAX_DEN: u32 = 1_000_000;

const PAGE: usize = 4096;
/// Length of the stub's code.
pub const STUB_LEN: usize = 38;

/// `M/N`: M calls in N go to the replacement, `0 < M < N <= MAX_DEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    num: u32,
    den: u32,
}

impl Ratio {
    /// `num/den`.
    ///
    /// # Errors
    /// `E_PATCH_CANARY_RATIO` unless `0 < num < den <= MAX_DEN`.
    pub fn new(num: u32, den: u32) -> Result<Ratio> {
        let bad = |why| {
            Err(Error::CanaryRatio {
                given: format!("{num}/{den}"),
                why,
            })
        };
        if den == 0 {
            return bad("N is 0");
        }
        if den > MAX_DEN {
            return bad("N is too large");
        }
        if num == 0 {
            return bad("M is 0: no call would reach the replacement");
        }
        if num >= den {
            return bad("M >= N: every call would reach the replacement (that is a plain patch)");
        }
        Ok(Ratio { num, den })
    }

    /// Parses `M/N` (spaces around the numbers allowed).
    ///
    /// # Errors
    /// `E_PATCH_CANARY_RATIO` for anything else, or a ratio [`Ratio::new`]
    /// refuses.
    pub fn parse(s: &str) -> Result<Ratio> {
        let bad = |why| Error::CanaryRatio {
            given: s.to_owned(),
            why,
        };
        let (m, n) = s.split_once('/').ok_or_else(|| bad("no '/'"))?;
        let num = m
            .trim()
            .parse::<u32>()
            .map_err(|_| bad("M is not a whole number"))?;
        let den = n
            .trim()
            .parse::<u32>()
            .map_err(|_| bad("N is not a whole number"))?;
        Ratio::new(num, den)
    }

    /// M.
    pub fn num(&self) -> u32 {
        self.num
    }

    /// N.
    pub fn den(&self) -> u32 {
        self.den
    }

    /// `ceil(M * 2^32 / N)`: a previous counter value below it sends the
    /// call to the replacement. Below 2^32 since `M < N <= MAX_DEN`.
    pub fn threshold(&self) -> u32 {
        let t = (u64::from(self.num) << 32).div_ceil(u64::from(self.den));
        u32::try_from(t).unwrap_or(u32::MAX)
    }

    /// Whether the call that found the counter at `prev` goes to the
    /// replacement.
    pub fn to_canary(&self, prev: u32) -> bool {
        prev < self.threshold()
    }

    /// How many of `calls` consecutive calls, the first finding the counter
    /// at `start`, go to the replacement: what the stub does, computed
    /// (single-threaded, the stub's split is exactly this).
    pub fn canary_calls(&self, start: u32, calls: u64) -> u64 {
        let mut c = start;
        let mut n = 0;
        for _ in 0..calls {
            if self.to_canary(c) {
                n += 1;
            }
            c = c.wrapping_add(WEYL_STEP);
        }
        n
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.num, self.den)
    }
}

/// The stub's data cell.
#[repr(C)]
struct Data {
    ctr: AtomicU32,
    _pad: u32,
    current: AtomicUsize,
    canary: AtomicUsize,
}

/// A dispatcher stub (see the module docs). Its memory lives for the rest
/// of the process, so [`Canary::entry`] stays valid code after the handle
/// is dropped.
#[derive(Debug)]
pub struct Canary {
    code: usize,
    data: usize,
    ratio: Ratio,
}

/// The stub's bytes at `code`, its data cell at `data`.
fn encode(code: usize, data: usize, threshold: u32) -> Option<[u8; STUB_LEN]> {
    use crate::x86_64::encode::rel32;
    let mut b = [0u8; STUB_LEN];
    // endbr64
    b[0..4].copy_from_slice(&[0xF3, 0x0F, 0x1E, 0xFA]);
    // push rax
    b[4] = 0x50;
    // mov eax, imm32
    b[5] = 0xB8;
    b[6..10].copy_from_slice(&WEYL_STEP.to_le_bytes());
    // lock xadd dword [rip+disp32], eax (F0 0F C1 05 disp32), ends at 18
    b[10..14].copy_from_slice(&[0xF0, 0x0F, 0xC1, 0x05]);
    b[14..18].copy_from_slice(&rel32(code + 18, data)?.to_le_bytes());
    // cmp eax, imm32, ends at 23
    b[18] = 0x3D;
    b[19..23].copy_from_slice(&threshold.to_le_bytes());
    // pop rax
    b[23] = 0x58;
    // jb +6 (to 32)
    b[24..26].copy_from_slice(&[0x72, 0x06]);
    // jmp qword [rip+current], ends at 32
    b[26..28].copy_from_slice(&[0xFF, 0x25]);
    b[28..32].copy_from_slice(&rel32(code + 32, data + 8)?.to_le_bytes());
    // jmp qword [rip+canary], ends at 38
    b[32..34].copy_from_slice(&[0xFF, 0x25]);
    b[34..38].copy_from_slice(&rel32(code + 38, data + 16)?.to_le_bytes());
    Some(b)
}

impl Canary {
    /// Builds a stub sending `ratio` of its calls to `canary` and the rest
    /// to `current`. Nothing jumps to it until its [`Canary::entry`] is
    /// stored in a slot.
    ///
    /// # Safety
    /// `current` and `canary` must be functions of the same ABI and
    /// signature (the stub forwards every register and the stack as they
    /// are), valid for as long as the stub may be jumped to.
    ///
    /// # Errors
    /// `E_PATCH_NULL_ADDRESS`; `E_PATCH_OS` when the pages cannot be mapped;
    /// `E_PATCH_PROTECT_DENIED` when the code page cannot be made r-x.
    pub unsafe fn new(
        current: impl Into<RuntimeAddr>,
        canary: impl Into<RuntimeAddr>,
        ratio: Ratio,
    ) -> Result<Canary> {
        let (current, canary) = (current.into().as_usize(), canary.into().as_usize());
        if current == 0 {
            return Err(Error::NullAddress { what: "current" });
        }
        if canary == 0 {
            return Err(Error::NullAddress { what: "canary" });
        }
        // SAFETY: a fresh anonymous private mapping of two pages at an
        // address of the kernel's choice: it cannot overlap any memory of
        // the process.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::os("mmap of a canary stub"));
        }
        let code = p as usize;
        let data = code + PAGE;
        let Some(bytes) = encode(code, data, ratio.threshold()) else {
            // Unreachable: code and data are one page apart.
            return Err(Error::NoNearMemory { addr: code });
        };
        // SAFETY: the first page is ours, writable and not yet executable
        // nor referenced by anything: fill it with int3 and the stub.
        unsafe {
            std::ptr::write_bytes(p.cast::<u8>(), 0xCC, PAGE);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.cast::<u8>(), STUB_LEN);
        }
        let canary_stub = Canary { code, data, ratio };
        let d = canary_stub.data_cell();
        d.ctr.store(0, Ordering::Relaxed);
        d.current.store(current, Ordering::Relaxed);
        d.canary.store(canary, Ordering::Relaxed);
        // SAFETY: `p` is the page-aligned start of our mapping; only its
        // first page becomes r-x (never writable again). The mprotect's TLB
        // shootdown serializes every core that may run it later, and the
        // Release store of the entry into a slot publishes the bytes and the
        // data cell.
        let rc = unsafe { libc::mprotect(p, PAGE, libc::PROT_READ | libc::PROT_EXEC) };
        if rc != 0 {
            return Err(Error::ProtectDenied {
                addr: code,
                len: PAGE,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(canary_stub)
    }

    fn data_cell(&self) -> &'static Data {
        // SAFETY: `data` is the page-aligned rw- data page of the stub's
        // mapping, never unmapped; `Data` is 24 bytes of atomics, 8-aligned.
        unsafe { &*(self.data as *const Data) }
    }

    /// The stub's address: store it in a slot to start the canary.
    pub fn entry(&self) -> RuntimeAddr {
        RuntimeAddr::from(self.code)
    }

    /// The ratio.
    pub fn ratio(&self) -> Ratio {
        self.ratio
    }

    /// Where the other calls go.
    pub fn current(&self) -> RuntimeAddr {
        RuntimeAddr::from(self.data_cell().current.load(Ordering::Relaxed))
    }

    /// Where `ratio` of the calls go.
    pub fn canary(&self) -> RuntimeAddr {
        RuntimeAddr::from(self.data_cell().canary.load(Ordering::Relaxed))
    }

    /// The Weyl counter now (`calls * WEYL_STEP mod 2^32`).
    pub fn counter(&self) -> u32 {
        self.data_cell().ctr.load(Ordering::Relaxed)
    }

    /// Calls dispatched so far, modulo 2^32 (the counter times the
    /// step's inverse).
    pub fn dispatched(&self) -> u32 {
        self.counter().wrapping_mul(weyl_inverse())
    }
}

/// The inverse of [`WEYL_STEP`] modulo 2^32 (Newton's iteration).
pub fn weyl_inverse() -> u32 {
    let a = WEYL_STEP;
    let mut x = a; // correct to 3 bits for odd a
    for _ in 0..5 {
        x = x.wrapping_mul(2u32.wrapping_sub(a.wrapping_mul(x)));
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    #[test]
    fn ratios_parse_and_refuse() {
        assert_eq!(
            Ratio::parse("1/10").map(|r| (r.num(), r.den())).ok(),
            Some((1, 10))
        );
        assert_eq!(
            Ratio::parse(" 3 / 7 ").map(|r| r.to_string()).ok(),
            Some("3/7".into())
        );
        for bad in [
            "0/10",
            "11/10",
            "10/10",
            "1/0",
            "x",
            "1/",
            "/2",
            "-1/10",
            "1/2000000",
            "1.5/10",
        ] {
            let e = Ratio::parse(bad).expect_err(bad);
            assert_eq!(e.code(), crate::error::E_PATCH_CANARY_RATIO, "{bad}");
        }
        assert_eq!(Ratio::new(1, 2).map(|r| r.threshold()).ok(), Some(1 << 31));
        assert_eq!(
            Ratio::new(1, 10).map(|r| r.threshold()).ok(),
            Some(429_496_730)
        );
    }

    #[test]
    fn inverse_inverts() {
        assert_eq!(WEYL_STEP.wrapping_mul(weyl_inverse()), 1);
    }

    #[test]
    fn stub_decodes_as_designed() {
        let code = 0x10_0000usize;
        let b = encode(code, code + PAGE, 0x1234_5678).expect("encodes");
        let mut d = Decoder::with_ip(64, &b, code as u64, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = Vec::new();
        for i in &mut d {
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(s);
        }
        assert_eq!(
            out,
            [
                "endbr64",
                "push rax",
                "mov eax,9E3779B9h",
                "lock xadd [101000h],eax",
                "cmp eax,12345678h",
                "pop rax",
                "jb short 0000000000100020h",
                "jmp qword ptr [101008h]",
                "jmp qword ptr [101010h]",
            ]
        );
    }

    extern "C" fn cur(x: u64) -> u64 {
        x + 1
    }
    extern "C" fn can(x: u64) -> u64 {
        x + 1_000_000
    }

    #[test]
    fn stub_splits_exactly_single_threaded() {
        let r = Ratio::new(1, 10).expect("ratio");
        // SAFETY: both are `extern "C" fn(u64) -> u64`, static.
        let c = unsafe { Canary::new(cur as *const () as usize, can as *const () as usize, r) }
            .expect("stub");
        // SAFETY: the stub forwards to one of two `extern "C" fn(u64) -> u64`.
        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(c.entry().as_usize()) };
        let k = 100_000u64;
        let mut hits = 0;
        for i in 0..k {
            let y = std::hint::black_box(f)(i);
            if y == i + 1_000_000 {
                hits += 1;
            } else {
                assert_eq!(y, i + 1);
            }
        }
        assert_eq!(hits, r.canary_calls(0, k));
        assert!(hits.abs_diff(k / 10) <= 10, "{hits}");
        assert_eq!(c.dispatched(), k as u32);
    }
}
