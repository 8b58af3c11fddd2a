//! Patch sites: install, swap, disable, enable, remove.
//!
//! ```text
//! T:      [endbr64]  jmp rel32 -> relay          (5 bytes; endbr64 kept)
//! relay:  jmp qword ptr [rip+slot]               (near T, r-x page)
//! slot:   .quad <current destination>            (rw- page, atomic)
//! tramp:  [endbr64] <relocated prologue> jmp T+k (the callable original)
//! ```
//!
//! Install and remove write code with every other thread parked
//! (`world.rs`); swap, disable and enable are one atomic store to the slot.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::code::{self, Pages};
use crate::counters as stats;
use crate::error::{Error, Result};
use crate::maps;
use crate::near::{CELL_SIZE, Cell, Pool, TRAMPOLINE_OFFSET};
use crate::world::{self, Whereabouts};
use crate::x86_64::branches;
use crate::x86_64::decode;
use crate::x86_64::encode;
use crate::x86_64::relocate::{self, Trampoline};
use hotpatch_symbolizer::RuntimeAddr;

/// Options for [`Site::install`].
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The function's size in bytes, when known (symbol table): bounds the
    /// back-jump scan exactly and catches functions shorter than the patch.
    pub known_size: Option<usize>,
    /// A name for the site, used for the symbolizer's anonymous ranges
    /// (`hotpatch::trampoline<NAME>`). Defaults to the target address.
    pub name: Option<String>,
    /// How long to wait for other threads to park.
    pub stop_timeout: Duration,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            known_size: None,
            name: None,
            stop_timeout: Duration::from_millis(200),
        }
    }
}

/// A site's trampoline memory, kept per target after removal so that a
/// re-install of the same target reuses it (and `original()` pointers handed
/// out earlier keep pointing at valid code of the same function).
#[derive(Debug, Clone)]
struct CachedCell {
    cell: Cell,
    original: Vec<u8>,
    tramp: Trampoline,
    written: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Global {
    pool: Pool,
    /// Live sites by patch address: (patch end, entry).
    live: BTreeMap<usize, (usize, usize)>,
    cells: HashMap<usize, CachedCell>,
}

static GLOBAL: Mutex<Option<Global>> = Mutex::new(None);

/// The patcher lock: one install/remove (and so one stop-the-world) at a time.
pub(crate) fn lock_global() -> MutexGuard<'static, Option<Global>> {
    GLOBAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `addr` lies in the bytes of a live site.
pub fn is_patched(addr: impl Into<RuntimeAddr>) -> bool {
    let addr = addr.into().as_usize();
    let g = lock_global();
    g.as_ref()
        .is_some_and(|g| overlapping(g, addr, 1).is_some())
}

fn overlapping(g: &Global, start: usize, len: usize) -> Option<usize> {
    // A live site [p, end) overlaps [start, start+len) if p < start+len && end > start.
    g.live
        .range(..start + len)
        .next_back()
        .filter(|(_, (end, _))| *end > start)
        .map(|(&p, _)| p)
}

/// Reads the code at `target` for analysis: checks the mapping is readable
/// and executable and returns up to `want` bytes of it.
pub(crate) fn read_code(target: usize, want: usize) -> Result<(Vec<u8>, maps::Lookup)> {
    if target == 0 {
        return Err(Error::NullAddress { what: "target" });
    }
    let all = maps::lookup()?;
    let m = all.find(target).ok_or_else(|| Error::NotExecutable {
        addr: target,
        detail: "no mapping contains it".into(),
    })?;
    if !m.executable() || !m.readable() {
        return Err(Error::NotExecutable {
            addr: target,
            detail: format!(
                "mapping {:#x}-{:#x} is {} {}",
                m.start,
                m.end,
                m.perms(),
                m.name
            ),
        });
    }
    // Continue into directly following executable mappings (a function may
    // straddle a split VMA, e.g. after an earlier mprotect).
    let mut end = m.end;
    while let Some(next) = all.find(end).filter(|n| n.executable() && n.readable()) {
        end = next.end;
    }
    let n = want.min(end - target);
    let mut bytes = vec![0u8; n];
    // SAFETY: [target, target+n) lies in readable mappings per
    // /proc/self/maps just queried. A concurrent munmap of the target's module
    // would be a use-after-unload by the caller, which the safe API cannot
    // produce (it takes function pointers of loaded code).
    unsafe { std::ptr::copy_nonoverlapping(target as *const u8, bytes.as_mut_ptr(), n) };
    Ok((bytes, all))
}

/// How many bytes to read for analysing a function of `known_size`: the
/// function and up to 16 bytes of alignment padding after it; at least
/// enough for a forward padding hole in `jmp rel8` reach of a function
/// shorter than 5 bytes (`decode::find_hole`).
pub(crate) fn read_len(known_size: Option<usize>) -> usize {
    known_size.map_or(decode::MAX_HEURISTIC_SCAN, |n| (n + 16).max(160))
}

/// A live patch site (the untyped core of [`crate::Hook`]).
///
/// Dropping a site removes it; when removal fails (a thread could not be
/// stopped), the site is disabled instead — calls run the original — and its
/// memory is kept.
#[derive(Debug)]
pub struct Site {
    entry: usize,
    patch_at: usize,
    original: Vec<u8>,
    /// The entry's jump: 5 bytes (`jmp rel32`) or 2 (`jmp rel8` to `hole`).
    written: Vec<u8>,
    cell: Cell,
    tramp: Trampoline,
    replacement: usize,
    enabled: bool,
    installed: bool,
    name: String,
    stop_timeout: Duration,
    /// The pages holding the 5 jump bytes and their protections at install:
    /// remove restores exactly these (and needs no `/proc/self/maps` read).
    entry_pages: Pages,
    /// The padding hole holding the `jmp rel32` of a short function.
    hole: Option<Hole>,
}

/// A padding hole written by a site (`decode::find_hole`).
#[derive(Debug, Clone, Copy)]
struct Hole {
    at: usize,
    original: [u8; decode::HOLE_LEN],
    written: [u8; decode::HOLE_LEN],
    pages: Pages,
}

impl Site {
    /// Installs a patch: calls to `target` go to `replacement`. Both are
    /// [`RuntimeAddr`]s or anything that converts to one: a pointer
    /// (`f as *const u8`) or a `usize`.
    ///
    /// # Safety
    /// - `target` must be the first instruction of a function in code that
    ///   stays mapped while the site is installed (unload its module only
    ///   after removing the site);
    /// - `replacement` must be a function with the same ABI and signature
    ///   as `target`, valid for as long as the slot points to it;
    /// - the bytes of `target`'s function must not be read as data by the
    ///   program (they change).
    ///
    /// # Errors
    /// The refusals of [`crate::preflight`], plus `E_PATCH_ALREADY_PATCHED`,
    /// `E_PATCH_NO_NEAR_MEMORY`, `E_PATCH_PROTECT_DENIED`, `E_PATCH_THREAD_UNSTOPPABLE`.
    pub unsafe fn install(
        target: impl Into<RuntimeAddr>,
        replacement: impl Into<RuntimeAddr>,
        opts: &InstallOptions,
    ) -> Result<Site> {
        // SAFETY: the caller upholds `install`'s conditions.
        unsafe { Self::install_with(target.into(), replacement.into(), opts, true) }
    }

    /// [`Site::install`], but the site starts disabled (the slot points at
    /// the trampoline): a canary stub needs the trampoline's address
    /// ([`Site::original`]) before calls may reach it; [`Site::enable`]
    /// then starts it with one store.
    ///
    /// # Safety
    /// As [`Site::install`].
    ///
    /// # Errors
    /// As [`Site::install`].
    pub unsafe fn install_disabled(
        target: impl Into<RuntimeAddr>,
        replacement: impl Into<RuntimeAddr>,
        opts: &InstallOptions,
    ) -> Result<Site> {
        // SAFETY: the caller upholds `install`'s conditions.
        unsafe { Self::install_with(target.into(), replacement.into(), opts, false) }
    }

    unsafe fn install_with(
        target: RuntimeAddr,
        replacement: RuntimeAddr,
        opts: &InstallOptions,
        enabled: bool,
    ) -> Result<Site> {
        let target = target.as_usize();
        let replacement = replacement.as_usize();
        if replacement == 0 {
            return Err(Error::NullAddress {
                what: "replacement",
            });
        }
        let mut guard = lock_global();
        let g = guard.get_or_insert_with(Global::default);

        let (bytes, maps) = read_code(target, read_len(opts.known_size))?;
        if overlapping(g, target, 1).is_some() {
            return Err(Error::AlreadyPatched { addr: target });
        }
        let module = branches::module_of(target);
        let (mut a, refusal) = decode::analyse_in(target, &bytes, opts.known_size, module.as_ref());
        // Our own jump at the entry (a site of an earlier process image, or
        // one leaked by a failed remove) is also "already patched".
        let off = a.patch_at - target;
        if let Some(to) = encode::decode_jmp_rel32(a.patch_at, &bytes[off..]) {
            if g.pool
                .code_pages()
                .any(|p| to >= p && to < p + crate::near::PAGE)
            {
                return Err(Error::AlreadyPatched { addr: target });
            }
        }
        if let Some(e) = refusal {
            return Err(e);
        }
        // The bytes from the entry to the patch's end (the written ones among
        // them) must be no live site's bytes: neither its entry nor its hole.
        if overlapping(g, target, a.patch_end() - target).is_some() {
            return Err(Error::AlreadyPatched { addr: target });
        }
        // A padding hole is used by one site at a time: when a live site
        // holds the one found, look for the next free one.
        if let (Some(h), Some(m)) = (a.hole, module.as_ref()) {
            if overlapping(g, h, decode::HOLE_LEN).is_some() {
                let taken = |lo: usize, hi: usize| overlapping(g, lo, hi - lo).is_some();
                a.hole = decode::find_hole(&a, &bytes, m, &taken);
                if a.hole.is_none() {
                    return Err(Error::TooShort {
                        addr: target,
                        available: a.patch_len - a.padding,
                        padding: a.padding,
                    });
                }
            }
        }
        let original = bytes[off..off + a.patch_len].to_vec();
        // The hole's bytes (all int3, checked by `find_hole`), restored by
        // remove.
        let hole_original: Option<(usize, [u8; decode::HOLE_LEN])> = a.hole.map(|h| {
            let o = h - target;
            let mut b = [0u8; decode::HOLE_LEN];
            b.copy_from_slice(&bytes[o..o + decode::HOLE_LEN]);
            (h, b)
        });

        // Memory and code, all built before anything is stopped.
        let mut cached = match g.cells.get(&target) {
            Some(c) if c.original == original => c.clone(),
            _ => {
                let cell = g.pool.cell_near(target)?;
                let tramp = relocate::relocate(&a, cell.trampoline)?;
                if tramp.bytes.len() > CELL_SIZE - TRAMPOLINE_OFFSET {
                    return Err(Error::Unrelocatable {
                        at: a.patch_at,
                        instruction: decode::format(&a.overwritten[0]),
                        reason: format!("trampoline needs {} bytes", tramp.bytes.len()),
                    });
                }
                CachedCell {
                    cell,
                    original: original.clone(),
                    tramp,
                    written: false,
                }
            }
        };
        let cell = cached.cell;
        let relay = encode::jmp_indirect_rip(cell.relay, cell.slot)
            .ok_or(Error::NoNearMemory { addr: target })?;
        // The entry's jump: `jmp rel32` to the relay, or (a short function)
        // `jmp rel8` to the hole, which gets the `jmp rel32`.
        let (jump, hole_jump): (Vec<u8>, Option<[u8; decode::HOLE_LEN]>) = match a.hole {
            None => (
                encode::jmp_rel32(a.patch_at, cell.relay)
                    .ok_or(Error::NoNearMemory { addr: target })?
                    .to_vec(),
                None,
            ),
            Some(h) => (
                encode::jmp_rel8(a.patch_at, h)
                    .ok_or(Error::NoNearMemory { addr: target })?
                    .to_vec(),
                Some(encode::jmp_rel32(h, cell.relay).ok_or(Error::NoNearMemory { addr: target })?),
            ),
        };
        let mut cell_code = Vec::with_capacity(TRAMPOLINE_OFFSET + cached.tramp.bytes.len());
        cell_code.extend_from_slice(&relay);
        cell_code.resize(TRAMPOLINE_OFFSET, 0xCC);
        cell_code.extend_from_slice(&cached.tramp.bytes);

        // A fresh chunk may have been mapped since `maps` was taken: a
        // snapshot is retaken, the ioctl answers live.
        let maps_now = match maps {
            maps::Lookup::Snapshot(_) if !cached.written => maps::lookup()?,
            m => m,
        };
        let entry_pages = Pages::covering(&maps_now, a.patch_at, jump.len())?;
        let hole_pages = match a.hole {
            Some(h) => Some(Pages::covering(&maps_now, h, decode::HOLE_LEN)?),
            None => None,
        };
        let cell_pages = Pages::covering(&maps_now, cell.relay, cell_code.len())?;
        let first = if enabled {
            replacement
        } else {
            cached.tramp.at
        };
        cell.slot().store(first, Ordering::Release);

        let patch_at = a.patch_at;
        let patch_end = a.patch_end();
        let tramp = cached.tramp.clone();
        let write_cell = !cached.written;
        let hole = a.hole;
        let mut stuck = None;
        with_world_stopped(
            opts.stop_timeout,
            patch_at,
            patch_end,
            |parked, stragglers| {
                if write_cell {
                    code::write(&cell_pages, cell.relay, &cell_code, false, 0)?;
                }
                // Threads parked strictly inside the bytes move to the same
                // point of the trampoline.
                each_parked(parked, |rip| {
                    if hole.is_some_and(|h| rip >= h && rip < h + decode::HOLE_LEN) {
                        // Padding no code reaches (find_hole): a thread
                        // here means the index is wrong. Write nothing.
                        stuck = Some(rip);
                        rip
                    } else if rip > patch_at && rip < patch_end {
                        match tramp.forward(rip) {
                            Some(to) => {
                                stats::bump(&stats::FIXUPS_FORWARD);
                                to
                            }
                            None => {
                                stuck = Some(rip);
                                rip
                            }
                        }
                    } else {
                        rip
                    }
                });
                if stuck.is_some() {
                    // Leave the entry alone; the error is built after release
                    // (formatting allocates).
                    return Ok(());
                }
                // The hole first: nothing executes it until the entry's
                // `jmp rel8` exists, which `write` publishes after a core
                // sync (with stragglers, through the int3 protocol).
                if let (Some(h), Some(hj), Some(hp)) = (hole, hole_jump, hole_pages.as_ref()) {
                    code::write(hp, h, &hj, stragglers, tramp.at)?;
                }
                let r = code::write(&entry_pages, patch_at, &jump, stragglers, tramp.at);
                if r.is_err() && !holds(patch_at, &jump) {
                    // The entry was not written: put the hole back, so that
                    // no byte stays changed by a failed install. (If the
                    // entry holds the jump and only a protection could not
                    // be restored, the hole it jumps to must stay.)
                    if let (Some((h, orig)), Some(hp)) = (hole_original, hole_pages.as_ref()) {
                        let _ = code::write(hp, h, &orig, stragglers, tramp.at);
                    }
                }
                r
            },
        )?;
        if let Some(rip) = stuck {
            return Err(Error::ThreadUnstoppable {
                tid: 0,
                detail: format!("parked at {rip:#x}, not an instruction boundary"),
            });
        }

        let name = opts.name.clone().unwrap_or_else(|| format!("{target:#x}"));
        if write_cell {
            // A new cell: name its code for the symbolizer, once. Cells are
            // never freed nor reused for another target (near.rs), so the
            // ranges stay registered — a stale `original()` pointer or a
            // profile sample in them resolves for the life of the process.
            // Registration can only fail on a reentrant call from a registry
            // subscriber; the patch is correct without it.
            let reg = hotpatch_symbolizer::Registry::global();
            let _ = reg.register_anon(
                format!("hotpatch::relay<{name}>"),
                RuntimeAddr::from(cell.relay),
                encode::RELAY_LEN as u64,
            );
            let _ = reg.register_anon(
                format!("hotpatch::trampoline<{name}>"),
                RuntimeAddr::from(cell.trampoline),
                cached.tramp.bytes.len() as u64,
            );
        }
        cached.written = true;
        g.cells.insert(target, cached.clone());
        g.live.insert(patch_at, (patch_end, target));
        if let Some(h) = hole {
            g.live.insert(h, (h + decode::HOLE_LEN, target));
        }
        let hole = match (hole_original, hole_jump, hole_pages) {
            (Some((at, original)), Some(written), Some(pages)) => Some(Hole {
                at,
                original,
                written,
                pages,
            }),
            _ => None,
        };
        Ok(Site {
            entry: target,
            patch_at,
            original,
            written: jump,
            cell,
            tramp: cached.tramp,
            replacement,
            enabled,
            installed: true,
            name,
            stop_timeout: opts.stop_timeout,
            entry_pages,
            hole,
        })
    }

    /// Points the site at a new replacement: one atomic store, no thread
    /// stopped, no code written. Returns the previous replacement.
    ///
    /// # Safety
    /// `replacement` must satisfy the conditions of [`Site::install`].
    ///
    /// # Errors
    /// `E_PATCH_NOT_INSTALLED` after [`Site::remove`].
    pub unsafe fn swap(&mut self, replacement: impl Into<RuntimeAddr>) -> Result<RuntimeAddr> {
        self.check_installed()?;
        let replacement = replacement.into();
        if replacement.is_null() {
            return Err(Error::NullAddress {
                what: "replacement",
            });
        }
        let prev = std::mem::replace(&mut self.replacement, replacement.as_usize());
        if self.enabled {
            self.cell.slot().store(self.replacement, Ordering::Release);
        }
        Ok(RuntimeAddr::from(prev))
    }

    /// Calls go to the original again (slot = trampoline); the entry jump stays.
    ///
    /// # Errors
    /// `E_PATCH_NOT_INSTALLED` after [`Site::remove`].
    pub fn disable(&mut self) -> Result<()> {
        self.check_installed()?;
        self.enabled = false;
        self.cell.slot().store(self.tramp.at, Ordering::Release);
        Ok(())
    }

    /// Calls go to the replacement again.
    ///
    /// # Errors
    /// `E_PATCH_NOT_INSTALLED` after [`Site::remove`].
    pub fn enable(&mut self) -> Result<()> {
        self.check_installed()?;
        self.enabled = true;
        self.cell.slot().store(self.replacement, Ordering::Release);
        Ok(())
    }

    /// Whether calls currently go to the replacement.
    pub fn is_enabled(&self) -> bool {
        self.installed && self.enabled
    }

    /// Whether the entry jump is in place.
    pub fn is_installed(&self) -> bool {
        self.installed
    }

    /// Restores the original bytes exactly (and the pages' protections),
    /// with every other thread parked; a thread parked in the trampoline's
    /// relocated prologue is moved back to the original instruction.
    /// Idempotent.
    ///
    /// # Errors
    /// `E_PATCH_CODE_CHANGED` when the entry no longer holds our jump (nothing is
    /// written); `E_PATCH_THREAD_UNSTOPPABLE`; `E_PATCH_PROTECT_DENIED`.
    pub fn remove(&mut self) -> Result<()> {
        if !self.installed {
            return Ok(());
        }
        let mut guard = lock_global();
        let g = guard.get_or_insert_with(Global::default);
        // Only the 5 jump bytes ever changed (the rest of the overwritten
        // instructions were left in place), so only they are restored, on
        // the pages recorded at install.
        let mut now = [0u8; 5];
        let now = &mut now[..self.written.len()];
        if !hotpatch_sys::mem::read_self(self.patch_at, now) || *now != self.written[..] {
            return Err(Error::CodeChanged {
                addr: self.patch_at,
            });
        }
        if let Some(h) = &self.hole {
            let mut now = [0u8; decode::HOLE_LEN];
            if !hotpatch_sys::mem::read_self(h.at, &mut now) || now != h.written {
                return Err(Error::CodeChanged { addr: h.at });
            }
        }
        let pages = self.entry_pages;
        let patch_at = self.patch_at;
        let patch_end = patch_at + self.original.len();
        let tramp = &self.tramp;
        let original = &self.original[..self.written.len()];
        let body_end = tramp.jmp_back_at;
        let hole = self.hole;
        let mut stuck = None;
        with_world_stopped(
            self.stop_timeout,
            patch_at,
            patch_end,
            |parked, stragglers| {
                each_parked(parked, |rip| {
                    if let Some(h) = hole.filter(|h| rip >= h.at && rip < h.at + decode::HOLE_LEN) {
                        if rip == h.at {
                            // Took the entry's `jmp rel8`, not yet the hole's
                            // jump: nothing of the function has run. Resume
                            // at the entry's restored bytes.
                            stats::bump(&stats::FIXUPS_BACKWARD);
                            patch_at
                        } else {
                            // Not an instruction boundary of ours.
                            stuck = Some(rip);
                            rip
                        }
                    } else if rip >= tramp.at && rip < body_end {
                        match tramp.backward(rip) {
                            Some(to) => {
                                stats::bump(&stats::FIXUPS_BACKWARD);
                                to
                            }
                            None => rip,
                        }
                    } else {
                        rip
                    }
                });
                if stuck.is_some() {
                    return Ok(());
                }
                // A thread inside the trampoline between endbr and the first
                // relocated instruction is at an address the map lacks only for
                // the endbr itself, which stays valid code; leaving it is fine.
                let r = code::write(&pages, patch_at, original, stragglers, tramp.at);
                // Then the hole: after the entry's bytes are back no new
                // thread can reach it. A straggler that took the `jmp rel8`
                // before and was preempted at the hole finds its first byte
                // `int3` (from the protocol's first store on, and in the
                // original bytes, `find_hole`) and is sent to the trampoline.
                // Never while the entry still jumps to it (its write failed
                // before storing).
                match hole {
                    Some(h) if holds(patch_at, original) => {
                        let rh = code::write(&h.pages, h.at, &h.original, stragglers, tramp.at);
                        r.and(rh)
                    }
                    _ => r,
                }
            },
        )?;
        if let Some(rip) = stuck {
            return Err(Error::ThreadUnstoppable {
                tid: 0,
                detail: format!("parked at {rip:#x}, inside a padding hole's jump"),
            });
        }
        self.installed = false;
        g.live.remove(&self.patch_at);
        if let Some(h) = &self.hole {
            g.live.remove(&h.at);
        }
        Ok(())
    }

    /// The trampoline: calling it runs the original function.
    pub fn original(&self) -> RuntimeAddr {
        RuntimeAddr::from(self.tramp.at)
    }

    /// The target's entry address.
    pub fn target(&self) -> RuntimeAddr {
        RuntimeAddr::from(self.entry)
    }

    /// Where the jump is written (after `endbr64` if any).
    pub fn patch_address(&self) -> RuntimeAddr {
        RuntimeAddr::from(self.patch_at)
    }

    /// The bytes the jump overwrote (restored by `remove`).
    pub fn original_bytes(&self) -> &[u8] {
        &self.original
    }

    /// The padding hole holding the 5-byte jump of a short function
    /// (reached by the entry's `jmp rel8`), and its original bytes
    /// (restored by `remove`).
    pub fn hole(&self) -> Option<(RuntimeAddr, &[u8])> {
        self.hole
            .as_ref()
            .map(|h| (RuntimeAddr::from(h.at), &h.original[..]))
    }

    /// The relay address.
    pub fn relay(&self) -> RuntimeAddr {
        RuntimeAddr::from(self.cell.relay)
    }

    /// The current replacement.
    pub fn replacement(&self) -> RuntimeAddr {
        RuntimeAddr::from(self.replacement)
    }

    /// The site's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn check_installed(&self) -> Result<()> {
        if self.installed {
            Ok(())
        } else {
            Err(Error::NotInstalled { addr: self.entry })
        }
    }

    /// Leaves the site installed for the rest of the process, dropping the
    /// handle without removing it.
    pub fn leak(mut self) {
        self.installed = false;
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if self.installed && self.remove().is_err() {
            // Could not restore the bytes (e.g. a thread would not stop):
            // route calls to the original and keep the memory forever.
            let _ = self.disable();
        }
    }
}

/// Whether the code at `addr` is `bytes` now. Stopped-world safe (volatile
/// reads, no allocation).
fn holds(addr: usize, bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| {
        // SAFETY: `addr..addr+len` is code of this site, mapped and readable
        // (its page protection is the original one or that plus write).
        unsafe { std::ptr::read_volatile((addr + i) as *const u8) == b }
    })
}

/// [`world::Stopped::for_each_parked`] over plain integers (the site's
/// arithmetic). Allocation-free.
fn each_parked(stopped: &world::Stopped, mut f: impl FnMut(usize) -> usize) {
    stopped.for_each_parked(|rip| RuntimeAddr::from(f(rip.as_usize())));
}

/// Stops the world, vets threads that would not park, runs `f` with the
/// world stopped, releases. `f` gets whether the int3 protocol is needed.
fn with_world_stopped(
    timeout: Duration,
    patch_at: usize,
    patch_end: usize,
    mut f: impl FnMut(&world::Stopped, bool) -> Result<()>,
) -> Result<()> {
    code::membarrier_register();
    let mut vetted: Vec<i32> = Vec::new();
    for attempt in 0..2 {
        stats::bump(&stats::STOPS);
        let stopped = world::stop(timeout)?;
        let n = stopped.straggler_count;
        if n == 0 {
            let r = f(&stopped, false);
            stopped.release();
            return r;
        }
        // Stragglers: each must be blocked in a system call somewhere other
        // than the bytes, and must not block SIGTRAP (the int3 protocol
        // sends it there if it wakes up and reaches the entry).
        let listed = n.min(stopped.stragglers.len());
        let mut unknown = None;
        for s in &stopped.stragglers[..listed] {
            match world::whereabouts(s.tid) {
                // `pc` follows the `syscall`; a restarted call re-executes
                // it at `pc - 2`, so a `syscall` ending at `patch_end`
                // (relocated, the last overwritten instruction) counts too.
                Whereabouts::InSyscall { pc }
                    if !(pc.as_usize() > patch_at && pc.as_usize() <= patch_end) =>
                {
                    if attempt == 1 && !vetted.contains(&s.tid) {
                        unknown = Some((s.tid, "appeared after vetting"));
                    }
                }
                Whereabouts::InSyscall { .. } => {
                    unknown = Some((s.tid, "blocked in a system call inside the bytes"))
                }
                Whereabouts::Running => {
                    unknown = Some((
                        s.tid,
                        "running with the stop signal blocked; position unknown",
                    ))
                }
                Whereabouts::Unknown => {}
            }
        }
        if n > listed {
            unknown = Some((0, "too many threads did not stop"));
        }
        if unknown.is_none() && attempt == 1 && membarrier_ok() {
            stats::bump(&stats::INT3_WRITES);
            let r = f(&stopped, true);
            stopped.release();
            return r;
        }
        let stragglers: Vec<i32> = stopped.stragglers[..listed].iter().map(|s| s.tid).collect();
        stopped.release();
        if let Some((tid, why)) = unknown {
            stats::bump(&stats::REFUSED_UNSTOPPABLE);
            return Err(Error::ThreadUnstoppable {
                tid,
                detail: why.to_string(),
            });
        }
        if !membarrier_ok() {
            return Err(Error::ThreadUnstoppable {
                tid: stragglers[0],
                detail: "membarrier SYNC_CORE unavailable, cannot use the int3 protocol".into(),
            });
        }
        // World running again: vet signal masks (reads /proc, allocates).
        for tid in stragglers {
            if world::blocks_signal(tid, libc::SIGTRAP) == Some(true) {
                return Err(Error::ThreadUnstoppable {
                    tid,
                    detail: "blocks the stop signal and SIGTRAP".into(),
                });
            }
            vetted.push(tid);
        }
        code::install_trap_handler()?;
    }
    Err(Error::ThreadUnstoppable {
        tid: 0,
        detail: "threads kept changing while stopping".into(),
    })
}

fn membarrier_ok() -> bool {
    code::membarrier_register()
}
