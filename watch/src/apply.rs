//! The part that runs inside the target (served by the agent): place a
//! [`Bundle`] in memory within reach of the executable, resolve its
//! references to the process's own symbols (statics and thread-locals keep
//! their state), and redirect the changed functions — all as one step.
//!
//! Generations: every apply that places code builds generation N+1 from
//! everything that differs from the baseline (numbers are consecutive: a
//! bundle equal to the live generation's, or one that only puts functions
//! back, takes none, and the reply's `applied` says whether anything
//! changed); sites of functions already patched are
//! swapped (one atomic store each), new ones installed, sites of functions
//! back to their baseline code removed. Generation N is unmapped once no
//! site points into it and no thread runs in or returns into it
//! ([`hotpatch_patcher::quiesce::range_in_use`]); otherwise it is retried
//! at the next apply or revert.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hotpatch_patcher::{InstallOptions, Site};
use hotpatch_symbolizer::registry::ModuleKind;
use hotpatch_symbolizer::{Bias, ElfModuleSpec, ModuleId, Registry, RuntimeAddr};

use crate::bundle::{BTarget, Bundle, unhex};
use crate::error::{
    E_WATCH_BAD_BUNDLE, E_WATCH_BASELINE_MISMATCH, E_WATCH_IO, E_WATCH_NO_MEMORY, E_WATCH_NOTHING,
    E_WATCH_PATCH_REFUSED, E_WATCH_RELOCATION, E_WATCH_UNRESOLVED, Error, Result,
};
use crate::exe::ExeSymbols;
use crate::objects::SecKind;

const PAGE: usize = 4096;
const STUB_LEN: usize = 16;

/// What an apply or revert did: the agent's `watch_apply` reply itself
/// (one type on both sides of the socket).
pub use hotpatch_protocol::reply::WatchApplyInfo as ApplyReport;

#[derive(Debug)]
struct Generation {
    id: u64,
    base: usize,
    /// Bytes of code (and stubs) from `base`: what is unmapped on unload.
    /// The data after it (constants, vtables, new statics) stays mapped:
    /// new code may have stored pointers to it anywhere (a `&'static str`
    /// in a map), which no scan can find.
    len: usize,
    /// Symbolizer modules of its functions.
    modules: Vec<ModuleId>,
    /// Its unwind info as registered with libgcc (module, start), removed
    /// before its code is unmapped.
    unwind: Option<(ModuleId, u64)>,
}

#[derive(Debug)]
struct WatchSite {
    site: Site,
    display: String,
    generation: u64,
    /// The module of the replacement (pinned while the site points to it).
    module: Option<ModuleId>,
}

#[derive(Debug, Default)]
struct State {
    /// The number of the last generation placed (the next is `next + 1`):
    /// only a step that maps new code takes a number, so generations are
    /// numbered 1, 2, 3... in the order they went live.
    next: u64,
    current: u64,
    /// What the live generation was built from ([`digest`]): a bundle with
    /// the same content is what already runs, and is not applied again.
    live_digest: Option<u64>,
    /// Every range a generation was ever mapped at: a new generation is
    /// never placed where an old one was, so a stale pointer into old code
    /// (in a register, a dead stack slot the unload check scans) never
    /// names new code.
    used: Vec<(usize, usize)>,
    sites: BTreeMap<String, WatchSite>,
    generations: Vec<Generation>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// The running executable, as far as applying needs it.
#[derive(Debug)]
struct Process {
    syms: ExeSymbols,
    bias: u64,
    lo: usize,
    hi: usize,
    tls_modid: u64,
}

fn process() -> Result<&'static Process> {
    static P: OnceLock<std::result::Result<Process, Error>> = OnceLock::new();
    P.get_or_init(|| {
        // The executable is the module holding its entry point (AT_ENTRY).
        // Not by path: once cargo has rebuilt the binary, `current_exe()`
        // says "… (deleted)" and the registry may hold the path from before.
        // SAFETY: getauxval only reads the auxiliary vector.
        let here = unsafe { libc::getauxval(libc::AT_ENTRY) };
        let reg = Registry::global();
        let _ = reg.refresh();
        let m = reg
            .modules()
            .into_iter()
            .filter(|m| m.unloaded_seq.is_none())
            .find_map(|m| match &m.kind {
                ModuleKind::Elf(e)
                    if e.segments.iter().any(|s| {
                        let a = e.bias.to_runtime(s.vaddr).0;
                        s.is_exec() && a <= here && here < a + s.memsz
                    }) =>
                {
                    Some(e.clone())
                }
                _ => None,
            })
            .ok_or_else(|| {
                Error::new(E_WATCH_IO, "the executable is not in the module registry")
            })?;
        let syms = ExeSymbols::read(std::path::Path::new("/proc/self/exe"))?;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for (a, b) in m.exec_ranges() {
            lo = lo.min(a.0 as usize);
            hi = hi.max(b.0 as usize);
        }
        for s in &m.segments {
            let a = m.bias.to_runtime(s.vaddr).0 as usize;
            lo = lo.min(a);
            hi = hi.max(a + s.memsz as usize);
        }
        Ok(Process {
            syms,
            bias: m.bias.0,
            lo,
            hi,
            tls_modid: m.tls.map_or(0, |t| t.modid),
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

impl Process {
    fn func(&self, name: &str) -> Option<(usize, usize)> {
        self.syms
            .syms
            .get(name)
            .filter(|s| s.func && !s.tls)
            .map(|s| ((self.bias + s.value) as usize, s.size as usize))
    }

    fn addr(&self, name: &str) -> Result<usize> {
        if let Some(s) = self.syms.syms.get(name).filter(|s| !s.tls) {
            return Ok((self.bias + s.value) as usize);
        }
        let c = CString::new(name).map_err(|_| unresolved(name))?;
        // SAFETY: `c` is a NUL-terminated string; dlsym only reads it.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
        if p.is_null() {
            return Err(unresolved(name));
        }
        Ok(p as usize)
    }

    /// The offset of a thread-local of the executable from the thread
    /// pointer (the same in every thread: the executable's block is in the
    /// static TLS area).
    fn tpoff(&self, name: &str) -> Result<i64> {
        let s = self
            .syms
            .syms
            .get(name)
            .filter(|s| s.tls)
            .ok_or_else(|| unresolved(name))?;
        if self.tls_modid == 0 {
            return Err(unresolved(name));
        }
        #[repr(C)]
        struct TlsIndex {
            module: u64,
            offset: u64,
        }
        // SAFETY: a NUL-terminated literal; dlsym only reads it.
        let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__tls_get_addr".as_ptr()) };
        if f.is_null() {
            return Err(unresolved("__tls_get_addr"));
        }
        // SAFETY: `__tls_get_addr` has this C signature on x86-64 (it takes
        // a pointer to `tls_index` and returns the variable's address in the
        // calling thread).
        let get: extern "C" fn(*const TlsIndex) -> *mut u8 = unsafe { std::mem::transmute(f) };
        let idx = TlsIndex {
            module: self.tls_modid,
            offset: s.value,
        };
        let addr = get(&idx) as usize;
        let tp: usize;
        // SAFETY: on x86-64 Linux `fs:0` holds the thread pointer itself
        // (the TCB's self pointer); reading it has no side effect.
        unsafe {
            std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags))
        };
        Ok(addr as i64 - tp as i64)
    }
}

fn unresolved(name: &str) -> Error {
    Error::new(
        E_WATCH_UNRESOLVED,
        format!(
            "the new code refers to {} ({name}), which the running process does not define",
            crate::bundle::display_name(name)
        ),
    )
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(E_WATCH_BAD_BUNDLE, msg)
}

/// Memory mapped for one generation, unmapped on drop unless kept.
struct Mapped {
    base: usize,
    len: usize,
    keep: bool,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if !self.keep {
            // SAFETY: `base..base+len` is a mapping we made and nothing
            // refers to it (the step that made it failed before any site
            // pointed into it).
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        }
    }
}

/// Maps `len` bytes (read-write) within ±1 GiB of the executable, in
/// none of the `used` ranges.
fn map_near(p: &Process, len: usize, used: &[(usize, usize)]) -> Result<Mapped> {
    const STEP: usize = 2 << 20;
    let top = (p.hi + STEP - 1) & !(STEP - 1);
    let bottom = p.lo & !(STEP - 1);
    let mut hints = Vec::new();
    for k in 1..512usize {
        hints.push(top + k * STEP);
        if let Some(h) = bottom.checked_sub(k * STEP + ((len + STEP - 1) & !(STEP - 1))) {
            hints.push(h);
        }
    }
    for h in hints {
        let far = h.abs_diff(p.lo).max((h + len).abs_diff(p.hi));
        if far > (1 << 30) + (p.hi - p.lo) || used.iter().any(|&(a, b)| h < b && a < h + len) {
            continue;
        }
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping;
        // the result is checked.
        let r = unsafe {
            libc::mmap(
                h as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            continue;
        }
        if r as usize != h {
            // An old kernel ignoring MAP_FIXED_NOREPLACE placed it elsewhere.
            // SAFETY: the mapping just made, unused.
            unsafe { libc::munmap(r, len) };
            continue;
        }
        return Ok(Mapped {
            base: h,
            len,
            keep: false,
        });
    }
    Err(Error::new(
        E_WATCH_NO_MEMORY,
        format!("no {len} bytes free within 1 GiB of the executable"),
    ))
}

fn align(v: usize, a: usize) -> usize {
    let a = a.max(1);
    v.div_ceil(a) * a
}

const R_64: u32 = 1;
const R_PC32: u32 = 2;
const R_PLT32: u32 = 4;
const R_GOTPCREL: u32 = 9;
const R_32: u32 = 10;
const R_32S: u32 = 11;
const R_TPOFF64: u32 = 18;
const R_GOTTPOFF: u32 = 22;
const R_TPOFF32: u32 = 23;
const R_PC64: u32 = 24;
const R_GOTPCRELX: u32 = 41;
const R_REX_GOTPCRELX: u32 = 42;

#[derive(Clone, PartialEq, Eq, Hash)]
enum Slot {
    Addr(BTarget),
    Tpoff(String),
}

/// Places the bundle's sections, applies relocations, protects the pages.
/// Returns the mapping, each section's address and the length of the code
/// part (page-aligned, from the mapping's start).
fn place(p: &Process, b: &Bundle, used: &[(usize, usize)]) -> Result<(Mapped, Vec<usize>, usize)> {
    // Layout: code (+ stubs) | read-only (+ GOT) | writable.
    let mut off = vec![0usize; b.sections.len()];
    let mut sizes = [0usize; 3];
    let region = |k: SecKind| match k {
        SecKind::Code => Ok(0),
        SecKind::ReadOnly => Ok(1),
        SecKind::Data | SecKind::Bss => Ok(2),
        SecKind::Tls | SecKind::Other => Err(bad("a bundle section that cannot be placed")),
    };
    for (i, s) in b.sections.iter().enumerate() {
        if !s.align.is_power_of_two() || s.align > PAGE as u64 || s.size > (1 << 30) {
            return Err(bad(format!("section {}: bad alignment or size", s.name)));
        }
        if s.kind != SecKind::Bss && s.hex.len() as u64 != s.size * 2 {
            return Err(bad(format!(
                "section {}: bytes do not match its size",
                s.name
            )));
        }
        let r = region(s.kind)?;
        sizes[r] = align(sizes[r], s.align as usize);
        off[i] = sizes[r];
        sizes[r] += s.size as usize;
    }
    let mut stubs: HashMap<String, usize> = HashMap::new();
    let mut slots: HashMap<Slot, usize> = HashMap::new();
    for s in &b.sections {
        for r in &s.relocs {
            if let BTarget::Section { index, offset } = &r.target {
                let t = b
                    .sections
                    .get(*index)
                    .ok_or_else(|| bad("a relocation to a section that does not exist"))?;
                if *offset > t.size {
                    return Err(bad("a relocation past the end of its target section"));
                }
            }
            if r.offset.checked_add(8).is_none_or(|e| e > s.size) && r.r_type == R_64
                || r.offset.checked_add(4).is_none_or(|e| e > s.size)
            {
                return Err(bad(format!(
                    "section {}: a relocation past its end",
                    s.name
                )));
            }
            match (r.r_type, &r.target) {
                (R_PLT32 | R_PC32, BTarget::Symbol { name }) => {
                    let n = stubs.len();
                    stubs.entry(name.clone()).or_insert(n);
                }
                (R_GOTPCREL | R_GOTPCRELX | R_REX_GOTPCRELX, t) => {
                    let n = slots.len();
                    slots.entry(Slot::Addr(t.clone())).or_insert(n);
                }
                (R_GOTTPOFF, BTarget::Symbol { name }) => {
                    let n = slots.len();
                    slots.entry(Slot::Tpoff(name.clone())).or_insert(n);
                }
                _ => {}
            }
        }
    }
    let stub_at = align(sizes[0], 16);
    sizes[0] = stub_at + stubs.len() * STUB_LEN;
    let got_at = align(sizes[1], 8);
    sizes[1] = got_at + slots.len() * 8;
    let starts = [
        0,
        align(sizes[0], PAGE),
        align(sizes[0], PAGE) + align(sizes[1], PAGE),
    ];
    let total = (starts[2] + align(sizes[2], PAGE)).max(PAGE);
    let map = map_near(p, total, used)?;
    let base = map.base;
    let addr_of: Vec<usize> = b
        .sections
        .iter()
        .enumerate()
        .map(|(i, s)| base + starts[region(s.kind).unwrap_or(0)] + off[i])
        .collect();
    // SAFETY (for the writes below): every address written lies in
    // `base..base+total`, our fresh read-write mapping — checked offsets:
    // sections were laid out within their region, relocation offsets
    // were checked against their section's size above.
    let write = |at: usize, bytes: &[u8]| {
        debug_assert!(at >= base && at + bytes.len() <= base + total);
        // SAFETY: see above.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len()) };
    };
    for (i, s) in b.sections.iter().enumerate() {
        if s.kind != SecKind::Bss {
            write(addr_of[i], &unhex(&s.hex)?);
        }
    }
    let target_addr = |t: &BTarget| -> Result<usize> {
        match t {
            BTarget::Section { index, offset } => Ok(addr_of[*index] + *offset as usize),
            BTarget::Symbol { name } => p.addr(name),
        }
    };
    let mut stub_addr: HashMap<&str, usize> = HashMap::new();
    for (name, n) in &stubs {
        let at = base + stub_at + n * STUB_LEN;
        // `jmp qword ptr [rip+0]` then the 8-byte destination.
        let mut code = [0xccu8; STUB_LEN];
        code[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
        // An unknown symbol is an error wherever it is used.
        let dest = p.addr(name)?;
        code[6..14].copy_from_slice(&(dest as u64).to_le_bytes());
        write(at, &code);
        stub_addr.insert(name.as_str(), at);
    }
    let mut slot_addr: HashMap<Slot, usize> = HashMap::new();
    for (slot, n) in &slots {
        let at = base + starts[1] + got_at + n * 8;
        let v: u64 = match slot {
            Slot::Addr(t) => target_addr(t)? as u64,
            Slot::Tpoff(name) => p.tpoff(name)? as u64,
        };
        write(at, &v.to_le_bytes());
        slot_addr.insert(slot.clone(), at);
    }
    for (i, s) in b.sections.iter().enumerate() {
        for r in &s.relocs {
            let place = addr_of[i] + r.offset as usize;
            let a = r.addend;
            let overflow = || {
                Error::new(
                    E_WATCH_RELOCATION,
                    format!(
                        "relocation type {} at {}+{:#x} does not fit",
                        r.r_type, s.name, r.offset
                    ),
                )
            };
            let rel32 = |v: i64| -> Result<[u8; 4]> {
                i32::try_from(v)
                    .map(i32::to_le_bytes)
                    .map_err(|_| overflow())
            };
            match r.r_type {
                R_64 => write(place, &(target_addr(&r.target)? as i64 + a).to_le_bytes()),
                R_PC64 => write(
                    place,
                    &(target_addr(&r.target)? as i64 + a - place as i64).to_le_bytes(),
                ),
                R_PC32 | R_PLT32 => {
                    let mut s_addr = target_addr(&r.target)? as i64;
                    let v = s_addr + a - place as i64;
                    if i32::try_from(v).is_err() {
                        if let BTarget::Symbol { name } = &r.target {
                            if p.func(name).is_none() || r.r_type == R_PLT32 {
                                s_addr = stub_addr[name.as_str()] as i64;
                            }
                        }
                    }
                    write(place, &rel32(s_addr + a - place as i64)?);
                }
                R_GOTPCREL | R_GOTPCRELX | R_REX_GOTPCRELX => {
                    let g = slot_addr[&Slot::Addr(r.target.clone())] as i64;
                    write(place, &rel32(g + a - place as i64)?);
                }
                R_GOTTPOFF => {
                    let BTarget::Symbol { name } = &r.target else {
                        return Err(bad("GOTTPOFF to a patch section"));
                    };
                    let g = slot_addr[&Slot::Tpoff(name.clone())] as i64;
                    write(place, &rel32(g + a - place as i64)?);
                }
                R_TPOFF32 | R_TPOFF64 => {
                    let BTarget::Symbol { name } = &r.target else {
                        return Err(bad("TPOFF to a patch section"));
                    };
                    let v = p.tpoff(name)? + a;
                    if r.r_type == R_TPOFF32 {
                        write(place, &rel32(v)?);
                    } else {
                        write(place, &v.to_le_bytes());
                    }
                }
                R_32 => {
                    let v = target_addr(&r.target)? as i64 + a;
                    let v = u32::try_from(v).map_err(|_| overflow())?;
                    write(place, &v.to_le_bytes());
                }
                R_32S => write(place, &rel32(target_addr(&r.target)? as i64 + a)?),
                t => {
                    return Err(Error::new(
                        E_WATCH_RELOCATION,
                        format!(
                            "relocation type {t} (in {}) is not supported: the patch is not applied",
                            s.name
                        ),
                    ));
                }
            }
        }
    }
    let protect = |start: usize, len: usize, prot: i32| -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: a page-aligned range of our own mapping.
        let r = unsafe { libc::mprotect((base + start) as *mut libc::c_void, len, prot) };
        if r != 0 {
            return Err(crate::error::io(
                "mprotect",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    };
    protect(starts[0], starts[1], libc::PROT_READ | libc::PROT_EXEC)?;
    protect(starts[1], starts[2] - starts[1], libc::PROT_READ)?;
    Ok((map, addr_of, starts[1]))
}

/// The bundle's unwind info, checked: its `.eh_frame` section (read-only,
/// ending in the zero terminator, which no relocation touches) and the
/// code section and offset of its first FDE. `None` when it has none.
fn check_eh_frame(b: &Bundle) -> Result<Option<(usize, usize, u64)>> {
    let Some(e) = &b.eh_frame else {
        return Ok(None);
    };
    let eh = b
        .sections
        .get(e.section)
        .filter(|s| s.kind == SecKind::ReadOnly && s.size >= 4)
        .ok_or_else(|| bad("eh_frame: not a read-only section of the bundle"))?;
    let terminated = eh.hex.len() as u64 == eh.size * 2
        && eh.hex.ends_with("00000000")
        && eh.relocs.iter().all(|r| {
            let width = if matches!(r.r_type, R_64 | R_PC64) {
                8
            } else {
                4
            };
            r.offset + width <= eh.size - 4
        });
    if !terminated {
        return Err(bad("eh_frame: the section does not end in a terminator"));
    }
    b.sections
        .get(e.code)
        .filter(|s| s.kind == SecKind::Code && e.offset < s.size)
        .ok_or_else(|| bad("eh_frame: its first FDE is not in a code section"))?;
    Ok(Some((e.section, e.code, e.offset)))
}

/// A digest of what a bundle places and redirects (not its debug info):
/// equal for two builds of the same code.
fn digest(b: &Bundle) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    b.build_id.hash(&mut h);
    b.added.hash(&mut h);
    for f in &b.functions {
        (&f.name, f.section, f.offset).hash(&mut h);
    }
    for s in &b.sections {
        (&s.name, s.kind, s.align, s.size, &s.hex).hash(&mut h);
        for r in &s.relocs {
            (r.offset, r.r_type, &r.target, r.addend).hash(&mut h);
        }
    }
    h.finish()
}

fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn refused(display: &str, code: &str, msg: &str) -> Error {
    Error::new(
        E_WATCH_PATCH_REFUSED,
        format!("{display}: {code}: {msg}; nothing was applied"),
    )
}

/// Applies a bundle as the next generation (see the module docs).
///
/// # Errors
/// `E_WATCH_BASELINE_MISMATCH` (the bundle is for another executable),
/// `E_WATCH_BAD_BUNDLE`, `E_WATCH_UNRESOLVED`, `E_WATCH_RELOCATION`,
/// `E_WATCH_NO_MEMORY`, `E_WATCH_PATCH_REFUSED` (with the function's name
/// and the patcher's code). On error nothing changed, except after a swap
/// that failed part-way (the world could not be stopped): the sites before
/// it run the new generation, which stays mapped, and the message says so.
pub fn apply(b: &Bundle) -> Result<ApplyReport> {
    apply_in(b, None)
}

/// [`apply`], writing the generation's debug module (see [`crate::debug`])
/// into `debug_dir` (default: the system's temporary directory).
///
/// # Errors
/// As [`apply`].
pub fn apply_in(b: &Bundle, debug_dir: Option<&Path>) -> Result<ApplyReport> {
    let t0 = Instant::now();
    let p = process()?;
    if b.build_id != p.syms.build_id {
        return Err(Error::new(
            E_WATCH_BASELINE_MISMATCH,
            format!(
                "the patch was built against executable {}, this process runs {}",
                b.build_id, p.syms.build_id
            ),
        ));
    }
    let mut targets = Vec::new();
    for f in &b.functions {
        let (addr, size) = p.func(&f.name).ok_or_else(|| unresolved(&f.name))?;
        let sec = b
            .sections
            .get(f.section)
            .filter(|s| s.kind == SecKind::Code && f.offset < s.size)
            .ok_or_else(|| bad(format!("{}: no code section", f.display)))?;
        let _ = sec;
        targets.push((f, addr, size));
    }
    let mut guard = lock();
    let st = guard.get_or_insert_with(State::default);
    if b.functions.is_empty() {
        // Every function is back to its original code: the sites go, and
        // no generation is placed (nor numbered) for that.
        return Ok(back_to_original(st, t0));
    }
    let digest = digest(b);
    let unchanged = st.current != 0
        && st.live_digest == Some(digest)
        && st
            .sites
            .values()
            .all(|w| w.generation == st.current && w.site.is_enabled());
    if unchanged {
        // The same build as the live generation: nothing to do.
        let (unloaded, retained) = retire(st);
        return Ok(ApplyReport {
            generation: st.current,
            applied: false,
            unloaded,
            retained,
            micros: t0.elapsed().as_micros() as u64,
            ..ApplyReport::default()
        });
    }
    trace(&format!(
        "apply: process known at {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    // Preflight every new site before anything is written.
    for (f, addr, size) in &targets {
        if st.sites.contains_key(&f.name) {
            continue;
        }
        let rep = hotpatch_patcher::preflight(*addr as *const u8, Some(*size))
            .map_err(|e| refused(&f.display, e.code(), &e.to_string()))?;
        if let Err(r) = rep.verdict {
            return Err(refused(&f.display, r.code, &r.message));
        }
    }
    trace(&format!(
        "apply: preflight at {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    let unwind_at = check_eh_frame(b)?;
    let (mut map, addr_of, code_len) = place(p, b, &st.used)?;
    let gen_id = st.next + 1;
    // Name the new code in the symbolizer: a module with the new build's
    // DWARF when it can be written, else one anonymous range per function.
    let reg = Registry::global();
    trace(&format!(
        "apply: placed at {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    let (modules, module_at, debug_file) =
        name_code(p, b, &addr_of, (map.base, code_len), gen_id, debug_dir);
    trace(&format!(
        "apply: named at {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    let unwind = unwind_at.and_then(|(eh, code, offset)| {
        let start = (addr_of[code] + offset as usize) as u64;
        let id = module_at
            .get(&code)
            .copied()
            .or_else(|| modules.first().copied())?;
        let end = (map.base + code_len) as u64;
        // SAFETY: `eh` is the bundle's `.eh_frame` section, checked to end
        // in a zero terminator (`check_eh_frame`) and relocated against
        // the code's addresses (`place`); it lies in the generation's
        // read-only data, which is never unmapped, and its FDEs describe
        // the generation's code, whose registration `retire` removes
        // before unmapping it.
        let ok = unsafe {
            hotpatch_profiler::register_eh_frame(id, start, end - start, addr_of[eh] as *const u8)
        };
        if !ok {
            trace(&format!(
                "generation {gen_id}: its unwind info was not registered (a panic through it aborts)"
            ));
        }
        ok.then_some((id, start))
    });
    let unregister_all = |modules: &[ModuleId]| {
        if let Some((id, start)) = unwind {
            hotpatch_profiler::deregister_eh_frame(id, start);
        }
        for m in modules {
            let _ = reg.unregister(*m);
        }
    };
    trace(&format!(
        "apply: named and unwind info at {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    // Install new sites (all or nothing).
    let mut installed: Vec<String> = Vec::new();
    let mut failure = None;
    for (f, addr, size) in &targets {
        if st.sites.contains_key(&f.name) {
            continue;
        }
        let to = addr_of[f.section] + f.offset as usize;
        let opts = InstallOptions {
            known_size: Some(*size),
            name: Some(f.display.clone()),
            ..InstallOptions::default()
        };
        // SAFETY: `addr` is the entry of the executable's function `f.name`
        // (its symbol table), never unmapped; `to` is the entry of the new
        // build of the same function (same signature: the client refused
        // signature changes), in a mapping kept while a site points to it.
        match unsafe { Site::install(*addr as *const u8, to as *const u8, &opts) } {
            Ok(site) => {
                let module = module_at.get(&f.section).copied();
                if let Some(m) = module {
                    let _ = reg.pin(m);
                }
                st.sites.insert(
                    f.name.clone(),
                    WatchSite {
                        site,
                        display: f.display.clone(),
                        generation: gen_id,
                        module,
                    },
                );
                installed.push(f.name.clone());
            }
            Err(e) => {
                failure = Some(refused(&f.display, e.code(), &e.to_string()));
                break;
            }
        }
    }
    if let Some(err) = failure {
        for name in installed {
            if let Some(mut w) = st.sites.remove(&name) {
                if w.site.remove().is_err() {
                    // Could not stop the world: the site stays, disabled
                    // (calls run the original), and its target code must
                    // stay mapped.
                    let _ = w.site.disable();
                    map.keep = true;
                    w.site.leak();
                }
                if let Some(m) = w.module {
                    let _ = reg.unpin(m);
                }
            }
        }
        if !map.keep {
            unregister_all(&modules);
            if let Some(f) = &debug_file {
                let _ = std::fs::remove_file(f);
            }
        }
        return Err(err);
    }
    trace(&format!(
        "apply: installed at {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    // Swap the sites of functions patched by an earlier generation. A swap
    // that fails (the world could not be stopped) ends the step, but the
    // sites installed or swapped before it point into this generation now:
    // it is kept like any live generation (never unmapped under them) and
    // the error says what runs what.
    let mut swapped = 0;
    let mut patched = Vec::new();
    let mut swap_failure = None;
    for (f, _, _) in &targets {
        patched.push(f.display.clone());
        let Some(w) = st.sites.get_mut(&f.name) else {
            continue;
        };
        if w.generation == gen_id {
            continue;
        }
        let to = addr_of[f.section] + f.offset as usize;
        // SAFETY: as for the install above.
        if let Err(e) = unsafe { w.site.swap(to as *const u8) } {
            swap_failure = Some(Error::new(
                E_WATCH_PATCH_REFUSED,
                format!(
                    "{}: {}: {e}; the step stopped there: the functions installed or swapped before it run generation {gen_id}, the others what they ran before (save again to retry)",
                    f.display,
                    e.code()
                ),
            ));
            break;
        }
        let module = module_at.get(&f.section).copied();
        if let Some(m) = module {
            let _ = reg.pin(m);
        }
        if let Some(old) = w.module.replace(module.unwrap_or(ModuleId(u64::MAX))) {
            let _ = reg.unpin(old);
        }
        if w.module == Some(ModuleId(u64::MAX)) {
            w.module = None;
        }
        w.generation = gen_id;
        swapped += 1;
    }
    // Functions back to their original code.
    let keep: std::collections::HashSet<&str> =
        b.functions.iter().map(|f| f.name.as_str()).collect();
    let gone: Vec<String> = st
        .sites
        .keys()
        .filter(|k| !keep.contains(k.as_str()) && swap_failure.is_none())
        .cloned()
        .collect();
    let reverted = remove_sites(st, &gone);
    map.keep = true;
    st.used.push((map.base, map.base + map.len));
    let bytes = map.len;
    st.generations.push(Generation {
        id: gen_id,
        base: map.base,
        len: code_len,
        modules,
        unwind,
    });
    st.current = gen_id;
    st.next = gen_id;
    if let Some(e) = swap_failure {
        // Not what the bundle says everywhere: the next save applies again.
        st.live_digest = None;
        return Err(e);
    }
    st.live_digest = Some(digest);
    trace(&format!(
        "apply: sites done at {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    let (unloaded, retained) = retire(st);
    trace(&format!(
        "apply: retired at {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    Ok(ApplyReport {
        generation: st.current,
        applied: true,
        patched,
        added: b
            .added
            .iter()
            .map(|n| crate::bundle::display_name(n))
            .collect(),
        installed: installed.len(),
        swapped,
        reverted,
        unloaded,
        retained,
        bytes,
        micros: t0.elapsed().as_micros() as u64,
        debug_file: debug_file.map(|f| f.display().to_string()),
    })
}

/// Registers the generation's code with the symbolizer: one ELF module
/// with the relocated DWARF and a symbol table (written to `dir`), or, if
/// that cannot be made, one anonymous range per function. Returns the
/// modules, the module of each code section, and the debug file.
fn name_code(
    p: &Process,
    b: &Bundle,
    addr_of: &[usize],
    code: (usize, usize),
    gen_id: u64,
    dir: Option<&Path>,
) -> (Vec<ModuleId>, HashMap<usize, ModuleId>, Option<PathBuf>) {
    let reg = Registry::global();
    let code_secs = || {
        b.sections
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == SecKind::Code && s.size > 0)
    };
    match debug_module(p, b, addr_of, code, gen_id, dir) {
        Ok((id, path)) => {
            let at = code_secs().map(|(i, _)| (i, id)).collect();
            return (vec![id], at, Some(path));
        }
        Err(e) => trace(&format!("no debug module for generation {gen_id}: {e}")),
    }
    let mut modules = Vec::new();
    let mut module_at = HashMap::new();
    for (i, s) in code_secs() {
        let name = format!(
            "{} [hotpatch watch gen {gen_id}]",
            s.function.as_deref().unwrap_or(&s.name)
        );
        if let Ok(id) = reg.register_anon(name, RuntimeAddr(addr_of[i] as u64), s.size) {
            modules.push(id);
            module_at.insert(i, id);
        }
    }
    (modules, module_at, None)
}

fn debug_module(
    p: &Process,
    b: &Bundle,
    addr_of: &[usize],
    code: (usize, usize),
    gen_id: u64,
    dir: Option<&Path>,
) -> Result<(ModuleId, PathBuf)> {
    if b.debug.is_empty() {
        return Err(bad("the bundle carries no debug sections"));
    }
    let tls = |name: &str| p.syms.syms.get(name).filter(|s| s.tls).map(|s| s.value);
    let debug = crate::debug::relocate(b, addr_of, &tls)?;
    let mut syms = Vec::new();
    let mut loads = Vec::new();
    for (i, s) in b.sections.iter().enumerate() {
        if s.kind != SecKind::Code || s.size == 0 {
            continue;
        }
        loads.push((addr_of[i] as u64, s.size));
        for f in &s.symbols {
            syms.push((f.name.clone(), addr_of[i] as u64 + f.offset, f.size));
        }
    }
    if loads.len() > 200 {
        // The registry's history carries at most 256 segments per module.
        loads = vec![(code.0 as u64, code.1 as u64)];
    }
    let image = crate::debug::elf_image((code.0 as u64, code.1 as u64), &loads, &debug, &syms);
    let dir = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let pid = std::process::id() as i32;
    let removed = crate::debug::sweep_exited(&dir);
    if removed > 0 {
        trace(&format!(
            "removed {removed} debug ELF(s) of exited processes"
        ));
    }
    let start = hotpatch_sys::procstart::start_time(pid).unwrap_or(0);
    let name = crate::debug::file_name(pid, start, gen_id);
    let path = crate::debug::write_file(&dir, &name, &image)?;
    match Registry::global().register_elf(ElfModuleSpec::file(&path, Bias(0))) {
        Ok(id) => Ok((id, path)),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(Error::new(
                E_WATCH_IO,
                format!("{}: not registered: {e}", path.display()),
            ))
        }
    }
}

/// With `HOTPATCH_WATCH_TRACE` set, prints `what` to stderr.
fn trace(what: &str) {
    if std::env::var_os("HOTPATCH_WATCH_TRACE").is_some() {
        eprintln!("hotpatch watch: {what}");
    }
}

fn remove_sites(st: &mut State, names: &[String]) -> Vec<String> {
    let reg = Registry::global();
    let mut out = Vec::new();
    for name in names {
        let Some(mut w) = st.sites.remove(name) else {
            continue;
        };
        match w.site.remove() {
            Ok(()) => {
                if let Some(m) = w.module {
                    let _ = reg.unpin(m);
                }
                out.push(w.display.clone());
            }
            Err(_) => {
                // Not removable now (a thread could not be stopped): calls go
                // to the original through the trampoline; the site is kept and
                // so is its generation (it stays pinned).
                let _ = w.site.disable();
                st.sites.insert(name.clone(), w);
            }
        }
    }
    out
}

/// Whether a thread runs in `[lo, hi)` or may return into it. A thread
/// found there is usually about to leave (the old code finishes its call):
/// asked a few times, 20 ms apart.
fn in_use(lo: usize, hi: usize) -> bool {
    for attempt in 0..5 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        match hotpatch_patcher::quiesce::range_in_use(lo, hi, Duration::from_millis(200)) {
            Ok(false) => return false,
            Ok(true) => {}
            Err(_) => return true,
        }
    }
    true
}

/// Unmaps every older generation no site points into and no thread is in.
fn retire(st: &mut State) -> (Vec<u64>, Vec<u64>) {
    let reg = Registry::global();
    let (mut unloaded, mut retained) = (Vec::new(), Vec::new());
    let current = st.next;
    let mut keep = Vec::new();
    for g in std::mem::take(&mut st.generations) {
        let pointed = st.sites.values().any(|w| {
            let r = w.site.replacement().as_usize();
            r >= g.base && r < g.base + g.len
        });
        if g.id == current && pointed {
            keep.push(g);
            continue;
        }
        if pointed || in_use(g.base, g.base + g.len) {
            retained.push(g.id);
            keep.push(g);
            continue;
        }
        if let Some((id, start)) = g.unwind {
            hotpatch_profiler::deregister_eh_frame(id, start);
        }
        for m in &g.modules {
            let _ = reg.unregister(*m);
        }
        // SAFETY: no site points into the generation's code and no thread
        // runs in it or holds a return address into it (checked with the
        // world stopped just above; new entries into it come only through
        // sites and direct calls from its own code, and pointers to its
        // changed functions taken as values are their original entries).
        // Its data part stays mapped.
        unsafe { libc::munmap(g.base as *mut libc::c_void, g.len) };
        unloaded.push(g.id);
    }
    st.generations = keep;
    (unloaded, retained)
}

/// Puts the original code back everywhere and unmaps what can be.
///
/// # Errors
/// `E_WATCH_NOTHING` when nothing was ever applied.
pub fn revert_all() -> Result<ApplyReport> {
    let t0 = Instant::now();
    let mut guard = lock();
    let Some(st) = guard.as_mut() else {
        return Err(Error::new(
            E_WATCH_NOTHING,
            "no patch of hotpatch watch was applied in this process",
        ));
    };
    Ok(back_to_original(st, t0))
}

/// Removes every site (generation 0; a site that cannot be removed is
/// disabled, so its calls run the original code too) and unmaps what can
/// be. Takes no generation number.
fn back_to_original(st: &mut State, t0: Instant) -> ApplyReport {
    let names: Vec<String> = st.sites.keys().cloned().collect();
    let reverted = remove_sites(st, &names);
    st.current = 0;
    st.live_digest = None;
    let (unloaded, retained) = retire(st);
    ApplyReport {
        generation: 0,
        applied: !reverted.is_empty(),
        reverted,
        unloaded,
        retained,
        micros: t0.elapsed().as_micros() as u64,
        ..ApplyReport::default()
    }
}

/// A generation of [`Status`] still mapped.
pub use hotpatch_protocol::reply::WatchMappedInfo as MappedGeneration;
/// One site of [`Status`].
pub use hotpatch_protocol::reply::WatchSiteInfo as SiteStatus;
/// What [`status`] says: the agent's `watch_status` reply itself.
pub use hotpatch_protocol::reply::WatchStatusInfo as Status;

/// The live generation, its sites and the generations still mapped (with
/// their addresses). Older generations that have become unused since the
/// last apply are unmapped first (listed in `unloaded`).
///
/// Also reads, once per process, what applying needs to know of the
/// executable (its symbol table), so that a `hotpatch watch` session that
/// asks for the status when it starts does not pay that on its first save.
pub fn status() -> Status {
    let _ = process();
    let mut guard = lock();
    match guard.as_mut() {
        None => Status::default(),
        Some(st) => {
            let (unloaded, _) = retire(st);
            Status {
                generation: st.current,
                sites: st
                    .sites
                    .values()
                    .map(|w| SiteStatus {
                        function: w.display.clone(),
                        generation: w.generation,
                        enabled: w.site.is_enabled(),
                    })
                    .collect(),
                mapped: st
                    .generations
                    .iter()
                    .map(|g| MappedGeneration {
                        generation: g.id,
                        base: g.base as u64,
                        len: g.len as u64,
                    })
                    .collect(),
                unloaded,
            }
        }
    }
}
