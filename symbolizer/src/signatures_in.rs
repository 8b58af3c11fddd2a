//! Signatures of a few functions of a big executable, without building an
//! `addr2line` context over all of its DWARF (seconds for a 70 MiB debug
//! build): only the compile units of one crate are read — rustc names each
//! `<root source, relative to DW_AT_comp_dir>/@/<codegen unit>`. `hotpatch watch` uses it
//! to compare a changed function's signature before and after an edit.

use std::collections::HashMap;
use std::path::Path;

use gimli::{EndianSlice, RunTimeEndian};

use crate::elf::{self, Mapped};
use crate::error::{Error, Result};
use crate::signature::Signature;

/// The DWARF signatures of the functions at `entries` (name → file virtual
/// address of the entry) in `path`, looking only at compile units of the
/// crate whose root source file is `root_src` (absolute). A function without a subprogram there is absent from the
/// result.
///
/// # Errors
/// The file's errors (`E_SYM_IO`, `E_SYM_NOT_ELF`...), `E_SYM_BAD_DWARF`.
pub fn signatures_in_crate(
    path: &Path,
    root_src: &Path,
    entries: &HashMap<String, u64>,
) -> Result<HashMap<String, Signature>> {
    let mut out = HashMap::new();
    each_crate_unit(path, root_src, |unit| {
        for (f, addr) in entries {
            if out.contains_key(f) {
                continue;
            }
            if let Some(s) = crate::signature::read(unit, *addr)? {
                out.insert(f.clone(), s);
            }
        }
        Ok(out.len() == entries.len())
    })?;
    Ok(out)
}

/// Runs `f` on each compile unit of the crate rooted at `root_src` in the
/// ELF file at `path`, until it returns `true` (done). The file's DWARF
/// sections are read once (compressed ones inflated); a unit's name is read
/// from its root entry alone, and a full `Unit` (line program, base
/// attributes) is built only for the crate's units.
///
/// # Errors
/// The file's errors (`E_SYM_IO`, `E_SYM_NOT_ELF`...), `E_SYM_BAD_DWARF`
/// (also for a DWARF error `f` returns).
fn each_crate_unit(
    path: &Path,
    root_src: &Path,
    mut f: impl FnMut(gimli::UnitRef<'_, Slice<'_>>) -> gimli::Result<bool>,
) -> Result<()> {
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
    let mut headers = dwarf.units();
    while let Some(h) = headers.next().map_err(bad)? {
        if !of_crate(&dwarf, &h, root_src).map_err(bad)? {
            continue;
        }
        let unit = dwarf.unit(h).map_err(bad)?;
        if f(unit.unit_ref(&dwarf)).map_err(bad)? {
            break;
        }
    }
    Ok(())
}

/// The memory layout of a type as DWARF gives it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// `DW_AT_byte_size`.
    pub size: Option<u64>,
    /// Direct members: name and offset (`DW_AT_data_member_location`).
    pub members: Vec<(String, Option<u64>)>,
}

/// Types of a crate and the functions that use them.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CrateTypes {
    /// Structures, unions and enums by qualified name (`a::b::T`, generic
    /// arguments as DWARF names them).
    pub layouts: HashMap<String, Layout>,
    /// For each type name: the linkage names of the functions whose DWARF
    /// (parameters, variables, through pointers and references) mentions it.
    pub users: HashMap<String, Vec<String>>,
}

struct Die {
    tag: gimli::DwTag,
    name: Option<String>,
    ty: Option<usize>,
}

/// Reads the layouts of the types of crate `crate_name` in `path` and which
/// functions use each (see [`CrateTypes`]).
///
/// # Errors
/// As [`signatures_in_crate`].
pub fn types_in_crate(path: &Path, root_src: &Path) -> Result<CrateTypes> {
    use gimli::constants as c;
    let mut out = CrateTypes::default();
    each_crate_unit(path, root_src, |u| {
        let mut dies: HashMap<usize, Die> = HashMap::new();
        let mut qualified: HashMap<usize, String> = HashMap::new();
        // (depth, namespace or type name) of the enclosing scopes.
        let mut scopes: Vec<(isize, String)> = Vec::new();
        // (depth, linkage name) of the enclosing subprogram.
        let mut func: Option<(isize, String)> = None;
        let mut uses: Vec<(String, usize)> = Vec::new();
        let mut current_type: Option<(isize, usize)> = None;
        let mut depth: isize = 0;
        let mut entries = u.entries();
        while let Some((delta, die)) = entries.next_dfs()? {
            depth += delta;
            while scopes.last().is_some_and(|(d, _)| *d >= depth) {
                scopes.pop();
            }
            if func.as_ref().is_some_and(|(d, _)| *d >= depth) {
                func = None;
            }
            if current_type.is_some_and(|(d, _)| d >= depth) {
                current_type = None;
            }
            let off = die.offset().0;
            let name = die
                .attr_value(c::DW_AT_name)?
                .and_then(|v| u.attr_string(v).ok())
                .map(|s| String::from_utf8_lossy(s.slice()).into_owned());
            let ty = match die.attr_value(c::DW_AT_type)? {
                Some(gimli::AttributeValue::UnitRef(o)) => Some(o.0),
                _ => None,
            };
            let tag = die.tag();
            match tag {
                c::DW_TAG_namespace => {
                    scopes.push((depth, name.clone().unwrap_or_default()));
                }
                c::DW_TAG_structure_type | c::DW_TAG_union_type | c::DW_TAG_enumeration_type => {
                    let mut q: Vec<&str> = scopes.iter().map(|(_, n)| n.as_str()).collect();
                    let n = name.clone().unwrap_or_default();
                    q.push(&n);
                    let q = q.join("::");
                    let size = match die.attr_value(c::DW_AT_byte_size)? {
                        Some(v) => v.udata_value(),
                        None => None,
                    };
                    if !n.is_empty() && die.attr_value(c::DW_AT_declaration)?.is_none() {
                        // Every unit that uses a type describes it: the
                        // first description is kept, with its members.
                        if let std::collections::hash_map::Entry::Vacant(v) =
                            out.layouts.entry(q.clone())
                        {
                            v.insert(Layout {
                                size,
                                members: Vec::new(),
                            });
                            current_type = Some((depth, off));
                        }
                        qualified.insert(off, q.clone());
                    }
                    scopes.push((depth, n));
                }
                c::DW_TAG_member => {
                    if let Some((d, t)) = current_type {
                        if depth == d + 1 {
                            let at = match die.attr_value(c::DW_AT_data_member_location)? {
                                Some(v) => v.udata_value(),
                                None => None,
                            };
                            if let Some(q) = qualified.get(&t) {
                                if let Some(l) = out.layouts.get_mut(q) {
                                    l.members.push((name.clone().unwrap_or_default(), at));
                                }
                            }
                        }
                    }
                }
                c::DW_TAG_subprogram => {
                    let linkage = die
                        .attr_value(c::DW_AT_linkage_name)?
                        .and_then(|v| u.attr_string(v).ok())
                        .map(|s| String::from_utf8_lossy(s.slice()).into_owned());
                    let has_code = die.attr_value(c::DW_AT_low_pc)?.is_some();
                    if let (Some(l), true) = (linkage, has_code) {
                        func = Some((depth, l));
                    }
                }
                _ => {}
            }
            if let (Some((_, f)), Some(t)) = (&func, ty) {
                uses.push((f.clone(), t));
            }
            dies.insert(off, Die { tag, name, ty });
        }
        // A use through pointers, references, typedefs, arrays reaches the
        // named type at the end of the chain.
        let resolve = |mut off: usize| -> Option<String> {
            for _ in 0..8 {
                if let Some(q) = qualified.get(&off) {
                    return Some(q.clone());
                }
                let d = dies.get(&off)?;
                let _ = (&d.tag, &d.name);
                off = d.ty?;
            }
            None
        };
        for (f, t) in uses {
            if let Some(q) = resolve(t) {
                let v = out.users.entry(q).or_default();
                if !v.contains(&f) {
                    v.push(f);
                }
            }
        }
        Ok(false)
    })?;
    Ok(out)
}

type Slice<'a> = EndianSlice<'a, RunTimeEndian>;

/// Whether the unit of header `h` belongs to the crate rooted at
/// `root_src`: its name is `<root>/@/<cgu>` and `comp_dir/<root>` is
/// `root_src`. Reads the root entry only.
fn of_crate(
    dwarf: &gimli::Dwarf<Slice<'_>>,
    h: &gimli::UnitHeader<Slice<'_>>,
    root_src: &Path,
) -> gimli::Result<bool> {
    let abbrevs = dwarf.abbreviations(h)?;
    let mut cursor = h.entries(&abbrevs);
    let Some((_, root)) = cursor.next_dfs()? else {
        return Ok(false);
    };
    let string = |v: Option<gimli::AttributeValue<Slice<'_>>>| -> Option<String> {
        let s = match v? {
            gimli::AttributeValue::String(s) => s,
            gimli::AttributeValue::DebugStrRef(o) => dwarf.string(o).ok()?,
            gimli::AttributeValue::DebugLineStrRef(o) => dwarf.line_string(o).ok()?,
            _ => return None,
        };
        Some(String::from_utf8_lossy(s.slice()).into_owned())
    };
    let Some(name) = string(root.attr_value(gimli::DW_AT_name)?) else {
        return Ok(false);
    };
    let Some((file, _cgu)) = name.split_once("/@/") else {
        return Ok(false);
    };
    let dir = string(root.attr_value(gimli::DW_AT_comp_dir)?).unwrap_or_default();
    Ok(Path::new(&dir).join(file) == root_src)
}
