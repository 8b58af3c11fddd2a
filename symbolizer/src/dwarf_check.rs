//! Which debug section of a file fails to parse.
//!
//! Resolution degrades gracefully on bad DWARF (a unit that does not parse
//! is skipped, an address falls back to the symbol tables), which keeps
//! `symbolize` working on damaged files but says nothing about why a
//! location came out as `??:0`. [`check_file`] walks the DWARF the way
//! resolution reads it (unit headers, abbreviations, entries and their
//! string references, line programs and their rows) and reports the first
//! failure of each section, for tools to print as warnings.

use std::borrow::Cow;
use std::path::Path;

use gimli::{EndianSlice, RunTimeEndian};
use object::{Object as _, ObjectSection as _};

use crate::elf::{self, Mapped};
use crate::error::Result;

/// A debug section that failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DwarfProblem {
    /// The section, e.g. `.debug_info`, `.debug_line`, `.debug_abbrev`.
    pub section: String,
    /// What the parser said.
    pub message: String,
}

impl std::fmt::Display for DwarfProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} does not parse: {}", self.section, self.message)
    }
}

/// Units walked at most (a bound on the work for a corrupted file).
const MAX_UNITS: usize = 1 << 20;

/// The debug sections of the ELF file at `path` that fail to parse, the
/// first failure of each; empty for sound DWARF or none at all.
///
/// # Errors
/// `E_SYM_IO`, `E_SYM_NOT_ELF`, `E_SYM_TRUNCATED` for the file itself.
pub fn check_file(path: &Path) -> Result<Vec<DwarfProblem>> {
    let mapped = Mapped::open(path)?;
    check_bytes(path, mapped.data())
}

/// [`check_file`] over an in-memory image (`path` names it in errors).
///
/// # Errors
/// `E_SYM_NOT_ELF`, `E_SYM_TRUNCATED`.
pub fn check_bytes(path: &Path, data: &[u8]) -> Result<Vec<DwarfProblem>> {
    let obj = elf::parse(path, data)?;
    let mut problems: Vec<DwarfProblem> = Vec::new();
    let mut note = |section: &str, message: String| {
        if !problems.iter().any(|p| p.section == section) {
            problems.push(DwarfProblem {
                section: section.to_owned(),
                message,
            });
        }
    };
    // A compressed section that does not decompress reads as empty.
    for s in obj.sections() {
        let Ok(name) = s.name() else { continue };
        if name.starts_with(".debug_") && s.uncompressed_data().is_err() {
            let e = s.uncompressed_data().err().map(|e| e.to_string());
            note(
                name,
                format!("cannot decompress: {}", e.unwrap_or_default()),
            );
        }
    }
    let endian = if obj.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    let sections = match gimli::DwarfSections::load(|id| {
        Ok::<Cow<'_, [u8]>, std::convert::Infallible>(elf::section(&obj, id.name()))
    }) {
        Ok(s) => s,
        Err(never) => match never {},
    };
    let dwarf = sections.borrow(|s| EndianSlice::new(s, endian));
    let mut units = dwarf.units();
    for _ in 0..MAX_UNITS {
        let header = match units.next() {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => {
                note(".debug_info", format!("unit header: {e}"));
                break;
            }
        };
        let abbrevs = match dwarf.abbreviations(&header) {
            Ok(a) => a,
            Err(e) => {
                note(".debug_abbrev", e.to_string());
                continue;
            }
        };
        let mut entries = header.entries(&abbrevs);
        let mut stmt_list = None;
        let mut comp_dir = None;
        let mut comp_name = None;
        let mut root = true;
        loop {
            let entry = match entries.next_dfs() {
                Ok(Some((_, e))) => e,
                Ok(None) => break,
                Err(e) => {
                    note(".debug_info", format!("entries: {e}"));
                    break;
                }
            };
            let mut attrs = entry.attrs();
            loop {
                match attrs.next() {
                    Ok(Some(a)) => {
                        if let gimli::AttributeValue::DebugStrRef(o) = a.value() {
                            match dwarf.debug_str.get_str(o) {
                                Ok(s) => {
                                    if root && a.name() == gimli::DW_AT_comp_dir {
                                        comp_dir = Some(s);
                                    } else if root && a.name() == gimli::DW_AT_name {
                                        comp_name = Some(s);
                                    }
                                }
                                Err(e) => note(".debug_str", e.to_string()),
                            }
                        }
                        if root && a.name() == gimli::DW_AT_stmt_list {
                            stmt_list = Some(a.value());
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        note(".debug_info", format!("attributes: {e}"));
                        break;
                    }
                }
            }
            root = false;
        }
        if let Some(gimli::AttributeValue::DebugLineRef(off)) = stmt_list {
            let program = dwarf
                .debug_line
                .program(off, header.address_size(), comp_dir, comp_name);
            match program {
                Ok(p) => {
                    let mut rows = p.rows();
                    loop {
                        match rows.next_row() {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(e) => {
                                note(".debug_line", format!("line program rows: {e}"));
                                break;
                            }
                        }
                    }
                }
                Err(e) => note(".debug_line", format!("line program header: {e}")),
            }
        }
    }
    Ok(problems)
}
