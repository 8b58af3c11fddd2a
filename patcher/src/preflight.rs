//! The preflight report: what a patch would overwrite, and the verdict.

use std::fmt;

use crate::error::{Refusal, Result};
use crate::site;
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
    /// Bytes of whole instructions overwritten.
    pub patch_len: usize,
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
        writeln!(f, "overwrites")?;
        for i in &self.overwritten {
            let hex: Vec<String> = i.bytes.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(f, "  {:#x}  {:<24} {}", i.addr, hex.join(" "), i.text)?;
        }
        match &self.verdict {
            Ok(()) => writeln!(f, "verdict     patchable"),
            Err(r) => writeln!(f, "verdict     refused {}", r.message),
        }
    }
}

/// Analyses the function at `target` exactly as install would, without
/// changing anything. `known_size` is the function's size when known.
///
/// # Errors
/// `E_NOT_EXECUTABLE` / `E_NULL_ADDRESS` when there is no code to analyse;
/// every other refusal is reported in the verdict, not as an error.
pub fn preflight(target: *const u8, known_size: Option<usize>) -> Result<PreflightReport> {
    let target = target as usize;
    let (bytes, _maps) = site::read_code(target, known_size.unwrap_or(decode::MAX_HEURISTIC_SCAN))?;
    let mut report = preflight_bytes(target, &bytes, known_size);
    if report.verdict.is_ok() && site::is_patched(target) {
        report.verdict = Err(Refusal::from(&crate::Error::AlreadyPatched {
            addr: target,
        }));
    }
    Ok(report)
}

/// The same analysis over bytes that are not (necessarily) mapped in this
/// process — e.g. a function read from an ELF file at its file offset, with
/// `entry` its virtual address. Used by the offline `hotpatch inspect`.
pub fn preflight_bytes(entry: usize, bytes: &[u8], known_size: Option<usize>) -> PreflightReport {
    let (a, refusal) = decode::analyse(entry, bytes, known_size);
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
        overwritten,
        scan: a.scan,
        verdict: match refusal {
            None => Ok(()),
            Some(e) => Err(Refusal::from(&e)),
        },
    }
}
