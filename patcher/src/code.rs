//! Writing code bytes while the world is stopped: page flips, the int3
//! protocol, and the instruction-cache/pipeline sync.
//!
//! Everything here runs between `world::stop` and `Stopped::release` and so
//! obeys the stopped-world rules: no allocation, no locks, no logging.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::near::PAGE;

/// A page and the protection it must get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageProt {
    /// Page address.
    pub page: usize,
    /// Its protection before the write (`PROT_*`).
    pub prot: i32,
}

/// Up to two pages: a 5..=19 byte write spans at most two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pages {
    pages: [PageProt; 2],
    n: usize,
}

impl Pages {
    /// The pages covering `[addr, addr+len)`, with protections from `maps`.
    ///
    /// # Errors
    /// `E_PATCH_NOT_EXECUTABLE` when a page is not mapped.
    pub fn covering(maps: &crate::maps::Lookup, addr: usize, len: usize) -> Result<Pages> {
        let first = addr & !(PAGE - 1);
        let last = (addr + len - 1) & !(PAGE - 1);
        let mut out = Pages {
            pages: [PageProt { page: 0, prot: 0 }; 2],
            n: 0,
        };
        let mut p = first;
        while p <= last {
            let m = maps.find(p).ok_or_else(|| Error::NotExecutable {
                addr: p,
                detail: "page not mapped".into(),
            })?;
            if out.n == 2 {
                return Err(Error::Unrelocatable {
                    at: addr,
                    instruction: String::new(),
                    reason: "write spans more than two pages".into(),
                });
            }
            out.pages[out.n] = PageProt {
                page: p,
                prot: m.prot,
            };
            out.n += 1;
            p += PAGE;
        }
        Ok(out)
    }

    fn iter(&self) -> impl Iterator<Item = &PageProt> {
        self.pages[..self.n].iter()
    }
}

static MEMBARRIER_READY: AtomicI32 = AtomicI32::new(0); // 0 unknown, 1 ok, -1 unsupported

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: i32 = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: i32 = 1 << 6;

/// Registers for `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE` once.
/// Returns whether it is available. Call with the world running.
pub fn membarrier_register() -> bool {
    match MEMBARRIER_READY.load(Ordering::Acquire) {
        1 => return true,
        -1 => return false,
        _ => {}
    }
    // SAFETY: membarrier takes integer arguments only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
            0,
            0,
        )
    };
    let ok = rc == 0;
    MEMBARRIER_READY.store(if ok { 1 } else { -1 }, Ordering::Release);
    ok
}

/// Makes every core running a thread of this process serialize its
/// instruction stream, so none executes stale code bytes.
pub fn sync_cores() {
    if MEMBARRIER_READY.load(Ordering::Acquire) == 1 {
        // SAFETY: integer arguments only; registration happened earlier.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            );
        }
    }
}

fn mprotect(page: usize, prot: i32) -> std::result::Result<(), i32> {
    // SAFETY: `page` is page-aligned and part of a mapping of this process
    // (checked by `Pages::covering` from /proc/self/maps before the stop).
    // Changing protection does not invalidate Rust references: no Rust
    // object lives in code pages.
    let rc = unsafe { libc::mprotect(page as *mut libc::c_void, PAGE, prot) };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: errno of this thread.
        Err(unsafe { *libc::__errno_location() })
    }
}

/// Makes `pages` writable. Executable pages stay executable (RWX) while the
/// world is stopped so that (a) the patching code itself may live on one of
/// them and (b) a straggler thread running nearby keeps running; when RWX is
/// denied (MemoryDenyWriteExecute, SELinux execmem) and `allow_rw` is true,
/// falls back to RW.
fn unprotect(pages: &Pages, allow_rw: bool) -> Result<()> {
    for (i, p) in pages.iter().enumerate() {
        let want = p.prot | libc::PROT_WRITE | libc::PROT_READ;
        let r = match mprotect(p.page, want) {
            Err(_) if allow_rw && want & libc::PROT_EXEC != 0 => {
                mprotect(p.page, libc::PROT_READ | libc::PROT_WRITE)
            }
            r => r,
        };
        if let Err(errno) = r {
            for q in pages.iter().take(i) {
                let _ = mprotect(q.page, q.prot);
            }
            return Err(Error::ProtectDenied {
                addr: p.page,
                len: PAGE,
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
    }
    Ok(())
}

fn reprotect(pages: &Pages) -> Result<()> {
    let mut first_err = None;
    for p in pages.iter() {
        if let Err(errno) = mprotect(p.page, p.prot) {
            first_err.get_or_insert((p.page, errno));
        }
    }
    match first_err {
        None => Ok(()),
        Some((page, errno)) => Err(Error::ProtectDenied {
            addr: page,
            len: PAGE,
            source: std::io::Error::from_raw_os_error(errno),
        }),
    }
}

fn store(dst: usize, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: the caller made [dst, dst+len) writable; volatile so the
        // compiler neither elides nor reorders the stores across the
        // surrounding syscalls.
        unsafe { std::ptr::write_volatile((dst + i) as *mut u8, b) };
    }
}

/// Writes `bytes` at `dst` (inside `pages`) while the world is stopped,
/// restoring each page's protection afterwards, then syncs cores.
///
/// With `stragglers` (threads that did not park but were vetted as outside
/// the bytes), uses the int3 protocol: `int3` at the first byte, sync, the
/// tail, sync, the first byte, sync; a thread reaching `dst` meanwhile traps
/// and is sent to `detour` (code equivalent to the bytes being replaced).
///
/// # Errors
/// `E_PATCH_PROTECT_DENIED` when a page cannot be made writable or restored.
pub fn write(
    pages: &Pages,
    dst: usize,
    bytes: &[u8],
    stragglers: bool,
    detour: usize,
) -> Result<()> {
    unprotect(pages, !stragglers)?;
    if stragglers && bytes.len() > 1 {
        publish_trap(dst, detour);
        store(dst, &[0xCC]);
        sync_cores();
        store(dst + 1, &bytes[1..]);
        sync_cores();
        store(dst, &bytes[..1]);
        sync_cores();
        // The entry stays published: a thread that trapped just before the
        // last store may still be on its way into the handler (preempted in
        // the kernel, so no membarrier waited for it); it must be redirected
        // even if later patches publish other sites meanwhile.
    } else {
        store(dst, bytes);
    }
    let r = reprotect(pages);
    sync_cores();
    r
}

/// Recently published `int3` sites: `TRAP_AT[i] + 1` is the RIP a trap
/// there reports, `TRAP_TO[i]` where the thread resumes. A ring rather than
/// one slot, so a thread still on its way into the handler from an earlier
/// write is redirected after later writes published other sites; an entry
/// is overwritten only [`TRAP_SITES`] writes later. Detours are trampolines,
/// which are never freed (near.rs), so an old entry never points at freed
/// code.
const TRAP_SITES: usize = 32;
static TRAP_AT: [AtomicUsize; TRAP_SITES] = [const { AtomicUsize::new(0) }; TRAP_SITES];
static TRAP_TO: [AtomicUsize; TRAP_SITES] = [const { AtomicUsize::new(0) }; TRAP_SITES];
static TRAP_NEXT: AtomicUsize = AtomicUsize::new(0);

/// Publishes `at -> to` before an `int3` is written at `at`. Called with the
/// patcher lock held (one writer).
fn publish_trap(at: usize, to: usize) {
    if let Some(i) = (0..TRAP_SITES).find(|&i| TRAP_AT[i].load(Ordering::Acquire) == at) {
        // Same site again: its detour is the same trampoline (or, if the
        // function's bytes changed, another one equivalent to them).
        TRAP_TO[i].store(to, Ordering::Release);
        return;
    }
    let i = TRAP_NEXT.fetch_add(1, Ordering::Relaxed) % TRAP_SITES;
    // Retire the old entry before changing its detour, then publish `at`
    // last: a handler never pairs an address with another site's detour.
    TRAP_AT[i].store(0, Ordering::Release);
    TRAP_TO[i].store(to, Ordering::Release);
    TRAP_AT[i].store(at, Ordering::Release);
}

/// Where a thread that trapped with `rip` (one past the `int3`) resumes, if
/// the `int3` is ours. Async-signal-safe: atomic loads only.
fn trap_detour(rip: usize) -> Option<usize> {
    (0..TRAP_SITES).find_map(|i| {
        let at = TRAP_AT[i].load(Ordering::Acquire);
        if at == 0 || rip != at.wrapping_add(1) {
            return None;
        }
        let to = TRAP_TO[i].load(Ordering::Acquire);
        // The slot may have been reused between the two loads (retired,
        // new detour, new address): only a detour read while the address
        // was still ours counts.
        (to != 0 && TRAP_AT[i].load(Ordering::Acquire) == at).then_some(to)
    })
}
static TRAP_INSTALLED: AtomicBool = AtomicBool::new(false);
/// The SIGTRAP disposition before ours, chained to for traps that are not ours.
static OLD_TRAP: std::sync::OnceLock<libc::sigaction> = std::sync::OnceLock::new();

/// Installs the SIGTRAP handler used by the int3 protocol (once). Call with
/// the world running and the patcher lock held.
///
/// # Errors
/// `E_PATCH_OS` when `sigaction` fails.
pub fn install_trap_handler() -> Result<()> {
    if TRAP_INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: querying the current disposition into a zeroed, owned struct.
    let old = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut old) != 0 {
            return Err(Error::os("sigaction(SIGTRAP, query)"));
        }
        old
    };
    // Published before our handler can run, so the handler always finds it.
    let _ = OLD_TRAP.set(old);
    // SAFETY: a zeroed sigaction filled with our async-signal-safe handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = trap_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()) != 0 {
            return Err(Error::os("sigaction(SIGTRAP)"));
        }
    }
    TRAP_INSTALLED.store(true, Ordering::Release);
    Ok(())
}

extern "C" fn trap_handler(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: with SA_SIGINFO the kernel passes the interrupted context.
    let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as usize;
    if let Some(to) = trap_detour(rip) {
        // SAFETY: as above; resuming at the detour runs code equivalent to
        // the bytes being written (the trampoline).
        unsafe {
            (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] = to as i64;
        }
        return;
    }
    // Not ours: behave as the previous disposition would.
    // OnceLock::get is a plain atomic load: async-signal-safe.
    let Some(old) = OLD_TRAP.get() else { return };
    let h = old.sa_sigaction;
    if h == libc::SIG_IGN {
        return;
    }
    if h == libc::SIG_DFL {
        // SAFETY: restoring the default action and re-raising reproduces
        // what would have happened without us (the process dumps core).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut());
            libc::raise(libc::SIGTRAP);
        }
        return;
    }
    if old.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO and so
        // has this signature.
        let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(i32) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trap_sites_survive_later_publications() {
        // Addresses no real trap reports (this test publishes no int3).
        let base = 0x10_0000_0000usize;
        publish_trap(base, 0xAAAA);
        for k in 1..TRAP_SITES {
            publish_trap(base + k * 16, 0xB000 + k);
        }
        // The first site is still answered after TRAP_SITES - 1 others.
        assert_eq!(trap_detour(base + 1), Some(0xAAAA));
        assert_eq!(trap_detour(base + 16 + 1), Some(0xB001));
        assert_eq!(trap_detour(base), None, "only rip = at + 1 is ours");
        // Republishing a site updates it in place, evicting nobody.
        publish_trap(base, 0xCCCC);
        assert_eq!(trap_detour(base + 1), Some(0xCCCC));
        assert_eq!(trap_detour(base + 16 + 1), Some(0xB001));
        // One more new site evicts the oldest slot, never pairing an
        // address with another site's detour.
        publish_trap(base + 4096, 0xDDDD);
        assert_eq!(trap_detour(base + 4096 + 1), Some(0xDDDD));
        for k in 0..TRAP_SITES {
            let at = base + k * 16;
            if let Some(to) = trap_detour(at + 1) {
                assert!(to == 0xCCCC || to == 0xB000 + k, "{at:#x} -> {to:#x}");
            }
        }
    }
}
