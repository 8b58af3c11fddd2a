//! Signatures of a few functions of a big executable, without building an
//! `addr2line` context over all of its DWARF (seconds for a 70 MiB debug
//! build): only the compile units whose name says they belong to one crate
//! (`…/@/<crate>.<cgu>`, rustc's naming) are read. `hotpatch watch` uses it
//! to compare a changed function's signature before and after an edit.

use std::collections::HashMap;
use std::path::Path;

use gimli::{EndianSlice, RunTimeEndian};

use crate::elf::{self, Mapped};
use crate::error::{Error, Result};
use crate::signature::Signature;

/// The DWARF signatures of the functions at `entries` (name → file virtual
/// address of the entry) in `path`, looking only at compile units of crate
/// `crate_name`. A function without a subprogram there is absent from the
/// result.
///
/// # Errors
/// The file's errors (`E_SYM_IO`, `E_SYM_NOT_ELF`...), `E_SYM_BAD_DWARF`.
pub fn signatures_in_crate(
    path: &Path,
    crate_name: &str,
    entries: &HashMap<String, u64>,
) -> Result<HashMap<String, Signature>> {
    let file = Mapped::open(path)?;
    let obj = elf::parse(path, file.data())?;
    let endian = if object::Object::is_little_endian(&obj) {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    let mut owned: HashMap<&'static str, std::borrow::Cow<'_, [u8]>> = HashMap::new();
    for name in [
        ".debug_info",
        ".debug_abbrev",
        ".debug_str",
        ".debug_line_str",
        ".debug_str_offsets",
        ".debug_addr",
        ".debug_ranges",
        ".debug_rnglists",
        ".debug_line",
        ".debug_types",
    ] {
        owned.insert(name, elf::section(&obj, name));
    }
    let bad = |e: gimli::Error| Error::BadDwarf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let dwarf = gimli::Dwarf::load(|id| -> std::result::Result<_, gimli::Error> {
        let bytes: &[u8] = owned.get(id.name()).map_or(&[], |c| &c[..]);
        Ok(EndianSlice::new(bytes, endian))
    })
    .map_err(bad)?;
    let marker = format!("/@/{crate_name}.");
    let mut out = HashMap::new();
    let mut headers = dwarf.units();
    while let Some(h) = headers.next().map_err(bad)? {
        // The unit's name from its root entry alone: a full `Unit` (line
        // program, base attributes) is built only for the crate's units.
        let abbrevs = dwarf.abbreviations(&h).map_err(bad)?;
        let mut cursor = h.entries(&abbrevs);
        let Some((_, root)) = cursor.next_dfs().map_err(bad)? else {
            continue;
        };
        let name = match root.attr_value(gimli::DW_AT_name).map_err(bad)? {
            Some(gimli::AttributeValue::String(s)) => Some(s),
            Some(gimli::AttributeValue::DebugStrRef(o)) => dwarf.string(o).ok(),
            Some(gimli::AttributeValue::DebugLineStrRef(o)) => dwarf.line_string(o).ok(),
            // Indexed strings need the unit's base: read it.
            Some(v) => dwarf
                .unit(h)
                .ok()
                .and_then(|u| dwarf.attr_string(&u, v).ok()),
            None => None,
        }
        .map(|s| String::from_utf8_lossy(s.slice()).into_owned())
        .unwrap_or_default();
        if !name.contains(&marker) {
            continue;
        }
        let unit = dwarf.unit(h).map_err(bad)?;
        for (f, addr) in entries {
            if out.contains_key(f) {
                continue;
            }
            if let Some(s) = crate::signature::read(unit.unit_ref(&dwarf), *addr).map_err(bad)? {
                out.insert(f.clone(), s);
            }
        }
        if out.len() == entries.len() {
            break;
        }
    }
    Ok(out)
}
