//! The preflight report: what a patch would overwrite, and the verdict.

use std::fmt;

use std::path::Path;

use hotpatch_symbolizer::{FileVirtAddr, RuntimeAddr};
use object::{Object, ObjectSegment, SegmentFlags};

use crate::error::{Error, Refusal, Result};
use crate::site;
use crate::x86_64::branches;
use crate::x86_64::decode::{self, ScanExtent};

/// One instruction the entry jump would overwrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overwritten {
    /// Its address.
    pub addr: usize,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Intel syntax.
    pub text: String,
}

/// What [`preflight`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreflightReport {
    /// The function's entry.
    pub target: usize,
    /// Whether the entry starts with `endbr64` (kept in place).
    pub endbr64: bool,
    /// Where the 5-byte jump would go.
    pub patch_at: usize,
    /// Bytes of whole instructions overwritten (with `padding`).
    pub patch_len: usize,
    /// Bytes of alignment padding after a function shorter than 5 bytes
    /// that the patch extends into.
    pub padding: usize,
    /// A function too short for 5 bytes even with its padding: the padding
    /// hole (5 `int3`s of no symbol, no branch target) that gets the
    /// `jmp rel32`, reached by a 2-byte `jmp rel8` at `patch_at`.
    pub hole: Option<usize>,
    /// The module whose every direct branch and function entry was checked
    /// (`None`: anonymous code or an unreadable file; only the function's
    /// own branches were checked).
    pub module: Option<String>,
    /// The instructions overwritten (possibly partial when refused).
    pub overwritten: Vec<Overwritten>,
    /// How far the back-jump scan went.
    pub scan: ScanExtent,
    /// `Ok` when install would proceed, else the refusal with its code.
    pub verdict: std::result::Result<(), Refusal>,
}

impl PreflightReport {
    /// True when the verdict is positive.
    pub fn is_patchable(&self) -> bool {
        self.verdict.is_ok()
    }
}

impl fmt::Display for PreflightReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "target      {:#x}", self.target)?;
        writeln!(
            f,
            "endbr64     {}",
            if self.endbr64 { "yes (kept)" } else { "no" }
        )?;
        writeln!(
            f,
            "patch at    {:#x} ({} bytes)",
            self.patch_at, self.patch_len
        )?;
        match self.scan {
            ScanExtent::Exact(n) => writeln!(f, "scan        {n} bytes (symbol size)")?,
            ScanExtent::Heuristic(n) => writeln!(f, "scan        {n} bytes (heuristic end)")?,
        }
        match &self.module {
            Some(m) => writeln!(f, "module scan {m}")?,
            None => writeln!(
                f,
                "module scan none (anonymous code: only this function's branches)"
            )?,
        }
        writeln!(f, "overwrites")?;
        for i in &self.overwritten {
            let hex: Vec<String> = i.bytes.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(f, "  {:#x}  {:<24} {}", i.addr, hex.join(" "), i.text)?;
        }
        if self.padding > 0 {
            writeln!(f, "  + {} byte(s) of alignment padding", self.padding)?;
        }
        if let Some(h) = self.hole {
            writeln!(
                f,
                "hole        {h:#x} (jmp rel8 at {:#x} to it; the jmp rel32 to the relay goes there)",
                self.patch_at
            )?;
        }
        match &self.verdict {
            Ok(()) => writeln!(f, "verdict     patchable"),
            Err(r) => writeln!(f, "verdict     refused {r}"),
        }
    }
}

/// Analyses the function at `target` exactly as install would, without
/// changing anything. `known_size` is the function's size when known.
///
/// # Errors
/// `E_PATCH_NOT_EXECUTABLE` / `E_PATCH_NULL_ADDRESS` when there is no code to analyse;
/// every other refusal is reported in the verdict, not as an error.
pub fn preflight(
    target: impl Into<RuntimeAddr>,
    known_size: Option<usize>,
) -> Result<PreflightReport> {
    let target = target.into().as_usize();
    let (bytes, _maps) = site::read_code(target, site::read_len(known_size))?;
    let module = branches::module_of(target);
    let mut report = report_for(target, &bytes, known_size, module.as_ref());
    if report.verdict.is_ok() && site::is_patched(target) {
        report.verdict = Err(Refusal::from(&crate::Error::AlreadyPatched {
            addr: target,
        }));
    }
    Ok(report)
}

/// The same analysis over bytes that are not (necessarily) mapped in this
/// process, as if they ran at `entry` (e.g. a copy of a function's code).
/// Only the function's own branches are checked; [`preflight_in_file`]
/// analyses a function of an ELF file with the rest of its module.
pub fn preflight_bytes(
    entry: impl Into<RuntimeAddr>,
    bytes: &[u8],
    known_size: Option<usize>,
) -> PreflightReport {
    report_for(entry.into().as_usize(), bytes, known_size, None)
}

/// The offline analysis of the function at file virtual address `vaddr`
/// (of `known_size` bytes, when known) in the ELF file at `path`, exactly as
/// install would run it in a process that loaded the file: with the
/// alignment padding after it and the index of every direct branch and
/// function symbol of the file. The report's addresses are the file's
/// virtual addresses (the module loaded with a zero bias).
///
/// # Errors
/// `E_PATCH_NOT_EXECUTABLE` when the file cannot be read, is not ELF, or
/// `vaddr` is not in an executable segment's file bytes.
pub fn preflight_in_file(
    path: &Path,
    vaddr: FileVirtAddr,
    known_size: Option<usize>,
) -> Result<PreflightReport> {
    let vaddr_u = vaddr.get() as usize;
    let data = std::fs::read(path).map_err(|e| Error::NotExecutable {
        addr: vaddr_u,
        detail: format!("{}: {e}", path.display()),
    })?;
    preflight_in_image(path, &data, vaddr, known_size)
}

/// [`preflight_in_file`] over the file's bytes already read (`data` holds
/// the whole file at `path`; the branch index is cached by path).
///
/// # Errors
/// As [`preflight_in_file`].
pub fn preflight_in_image(
    path: &Path,
    data: &[u8],
    vaddr: FileVirtAddr,
    known_size: Option<usize>,
) -> Result<PreflightReport> {
    let v = vaddr.get();
    let vaddr = v as usize;
    let not_exec = |detail: String| Error::NotExecutable {
        addr: vaddr,
        detail,
    };
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(data)
        .map_err(|e| not_exec(format!("{}: {e}", path.display())))?;
    let seg = elf
        .segments()
        .find(|g| {
            g.address() <= v
                && v < g.address() + g.size()
                && matches!(g.flags(), SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0)
        })
        .ok_or_else(|| not_exec(format!("not in an executable segment of {}", path.display())))?;
    let (off, fsz) = seg.file_range();
    let delta = v - seg.address();
    if delta >= fsz {
        return Err(not_exec("past the segment's file bytes".into()));
    }
    let want = site::read_len(known_size) as u64;
    let start = (off + delta) as usize;
    let end = (off + delta + want.min(fsz - delta)) as usize;
    let bytes = data
        .get(start..end)
        .ok_or_else(|| not_exec("truncated file".into()))?;
    let index = branches::for_file(path).map_err(not_exec)?;
    let view = branches::ModuleView {
        path: path.to_path_buf(),
        index,
        bias: 0,
    };
    Ok(report_for(vaddr, bytes, known_size, Some(&view)))
}

fn report_for(
    entry: usize,
    bytes: &[u8],
    known_size: Option<usize>,
    module: Option<&branches::ModuleView>,
) -> PreflightReport {
    let (a, refusal) = decode::analyse_in(entry, bytes, known_size, module);
    let overwritten = a
        .overwritten
        .iter()
        .map(|i| {
            let off = i.ip() as usize - entry;
            Overwritten {
                addr: i.ip() as usize,
                bytes: bytes.get(off..off + i.len()).unwrap_or_default().to_vec(),
                text: decode::format(i),
            }
        })
        .collect();
    PreflightReport {
        target: entry,
        endbr64: a.endbr.is_some(),
        patch_at: a.patch_at,
        patch_len: a.patch_len,
        padding: a.padding,
        hole: a.hole,
        module: module.map(|m| {
            format!(
                "{} ({} direct branches, {} function entries)",
                m.path.display(),
                m.index.branch_count(),
                m.index.entry_count()
            )
        }),
        overwritten,
        scan: a.scan,
        verdict: match refusal {
            None => Ok(()),
            Some(e) => Err(Refusal::from(&e)),
        },
    }
}
