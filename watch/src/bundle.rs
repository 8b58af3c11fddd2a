//! The per-function diff of two builds, and the patch bundle built from it:
//! the changed functions' code, every new function and anonymous constant
//! they reach, and relocations that name everything else (resolved to the
//! running process's copies by [`crate::apply`]).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{E_WATCH_BAD_BUNDLE, E_WATCH_NEW_TLS, Error, Result};
use crate::exe::ExeSym;
pub use crate::hex::{hex, unhex};
use crate::objects::{ObjSet, SecKind, SymKind};

/// What changed between the baseline's objects and the new build's.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Diff {
    /// Functions (mangled) in both builds whose code or references differ.
    pub changed: Vec<String>,
    /// Functions only in the new build.
    pub added: Vec<String>,
    /// Statics in both builds whose size, initializer or references differ.
    pub statics_changed: Vec<String>,
}

/// Compares two builds of one crate, per symbol.
pub fn diff(base: &ObjSet, new: &ObjSet) -> Diff {
    let mut d = Diff::default();
    for (name, def) in &new.defs {
        let kind = new.sym(*def).kind;
        match base.defs.get(name) {
            None if kind == SymKind::Func => d.added.push(name.clone()),
            None => {}
            Some(_) if base.identity(name) != new.identity(name) => match kind {
                SymKind::Func => d.changed.push(name.clone()),
                SymKind::Data | SymKind::Tls => d.statics_changed.push(name.clone()),
                _ => {}
            },
            Some(_) => {}
        }
    }
    d.changed.sort();
    d.added.sort();
    d.statics_changed.sort();
    d
}

/// A patch: sections to place in memory and the functions to redirect.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Build-id (hex) of the executable the bundle is for; the agent
    /// refuses a bundle for another one.
    pub build_id: String,
    /// Sections to place.
    pub sections: Vec<BSec>,
    /// Functions of the running process to redirect to new code.
    pub functions: Vec<BFunc>,
    /// New functions the new code reaches (mangled), placed but not
    /// patched (the process has no copy).
    pub added: Vec<String>,
    /// The DWARF of the objects the code comes from, one entry per object:
    /// relocated by the agent once the code's addresses are known, so the
    /// new code is named with its new `file:line` ([`crate::debug`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub debug: Vec<BDebug>,
    /// The code's own unwind info: a section of [`Bundle::sections`] laid
    /// out as a zero-terminated `.eh_frame` (the FDEs of the placed code,
    /// with their CIEs), registered by the agent so that a panic unwinds
    /// through the new code (and the sampler walks through it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eh_frame: Option<BEhFrame>,
}

/// Where a bundle's unwind info is, and the code it starts at.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BEhFrame {
    /// The `.eh_frame` section (read-only) in [`Bundle::sections`].
    pub section: usize,
    /// The code section of the lowest index that has an FDE...
    pub code: usize,
    /// ... and the offset in it where that FDE starts: the address libgcc
    /// must find it for (the registration's check).
    pub offset: u64,
}

/// The `.debug_*` sections of one object of the new build.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BDebug {
    /// The object (for messages).
    pub object: String,
    /// Its debug sections.
    pub sections: Vec<BDebugSec>,
}

/// One debug section of an object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BDebugSec {
    /// `.debug_info`, `.debug_line`...
    pub name: String,
    /// Its bytes, hex.
    pub hex: String,
    /// Relocations to apply (`R_X86_64_64`, `_32`, `DTPOFF32/64`).
    pub relocs: Vec<BDebugRel>,
}

/// A relocation of a debug section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BDebugRel {
    /// Offset in the section.
    pub offset: u64,
    /// `R_X86_64_*`.
    pub r_type: u32,
    /// What it refers to.
    pub target: DTarget,
    /// Addend.
    pub addend: i64,
}

/// What a relocation of a debug section refers to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum DTarget {
    /// A section of the patch ([`Bundle::sections`]).
    Section {
        /// Section index in [`Bundle::sections`].
        index: usize,
        /// Offset in it.
        offset: u64,
    },
    /// Another debug section of the same object, by name (its start).
    Debug {
        /// Section name.
        name: String,
    },
    /// A thread-local of the running process (its offset in the TLS block).
    Tls {
        /// Mangled name.
        name: String,
    },
    /// Code or data the patch does not carry (unchanged functions of the
    /// same object): resolved to 0, outside every range of the patch.
    Absent,
}

/// A section of the patch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BSec {
    /// Its name in the object (for messages).
    pub name: String,
    /// Code, read-only or writable data.
    pub kind: SecKind,
    /// Alignment (power of two).
    pub align: u64,
    /// Size in memory.
    pub size: u64,
    /// Its bytes, hex (empty for `Bss`).
    pub hex: String,
    /// Relocations to apply.
    pub relocs: Vec<BRel>,
    /// For a code section of a function: its display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// The functions it defines (the patch module's symbol table).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub symbols: Vec<BSym>,
}

/// A function symbol of a patch section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BSym {
    /// Mangled name.
    pub name: String,
    /// Offset in the section.
    pub offset: u64,
    /// `st_size`.
    pub size: u64,
}

/// A relocation of the patch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BRel {
    /// Offset in the section.
    pub offset: u64,
    /// `R_X86_64_*`.
    pub r_type: u32,
    /// What it refers to.
    pub target: BTarget,
    /// Addend.
    pub addend: i64,
}

/// What a relocation of the patch refers to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum BTarget {
    /// A place in the patch itself.
    Section {
        /// Section index in [`Bundle::sections`].
        index: usize,
        /// Offset in it.
        offset: u64,
    },
    /// A symbol of the running process, by name.
    Symbol {
        /// Mangled name.
        name: String,
    },
}

/// A function to redirect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BFunc {
    /// Mangled name (looked up in the process's symbol table).
    pub name: String,
    /// Demangled name, for messages.
    pub display: String,
    /// Section of the new code.
    pub section: usize,
    /// Offset of the entry in it.
    pub offset: u64,
}

/// Demangles a Rust symbol without its hash (`my::path::f`).
pub fn display_name(mangled: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(mangled))
}

const R_X86_64_PLT32: u32 = 4;

struct Builder<'a> {
    set: &'a ObjSet,
    exe: &'a HashMap<String, ExeSym>,
    patch: HashSet<String>,
    placed: HashMap<(usize, usize), usize>,
    sections: Vec<BSec>,
    queue: Vec<(usize, usize)>,
    added: Vec<String>,
}

impl Builder<'_> {
    fn place(&mut self, obj: usize, sec: usize) -> Result<usize> {
        if let Some(&i) = self.placed.get(&(obj, sec)) {
            return Ok(i);
        }
        let o = &self.set.objs[obj];
        let s = o
            .sections
            .get(sec)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::new(
                    E_WATCH_BAD_BUNDLE,
                    format!("{}: section {sec} is not loadable", o.path.display()),
                )
            })?;
        if s.kind == SecKind::Tls {
            return Err(Error::new(
                E_WATCH_NEW_TLS,
                format!(
                    "the new code needs thread-local data the running process does not have ({})",
                    s.name
                ),
            ));
        }
        if s.kind == SecKind::Other {
            return Err(Error::new(
                E_WATCH_BAD_BUNDLE,
                format!("the new code refers to the non-loaded section {}", s.name),
            ));
        }
        let function = o.named_in.get(&sec).and_then(|v| {
            v.iter()
                .map(|&i| &o.symbols[i])
                .find(|s| s.kind == SymKind::Func)
                .map(|s| display_name(&s.name))
        });
        let symbols = if s.kind == SecKind::Code {
            o.named_in
                .get(&sec)
                .into_iter()
                .flatten()
                .map(|&i| &o.symbols[i])
                .filter(|s| s.kind == SymKind::Func)
                .map(|s| BSym {
                    name: s.name.clone(),
                    offset: s.value,
                    size: s.size,
                })
                .collect()
        } else {
            Vec::new()
        };
        let i = self.sections.len();
        self.sections.push(BSec {
            name: s.name.clone(),
            kind: s.kind,
            align: s.align,
            size: s.size,
            hex: hex(&s.data),
            relocs: Vec::new(),
            function,
            symbols,
        });
        self.placed.insert((obj, sec), i);
        self.queue.push((obj, sec));
        Ok(i)
    }

    fn resolve(
        &mut self,
        obj: usize,
        sym: usize,
        addend: i64,
        r_type: u32,
    ) -> Result<(BTarget, i64)> {
        if let Some((name, a)) = self.set.named_target(obj, sym, addend) {
            let here = self.set.defs.get(&name).copied();
            // The address of a changed function taken as a value (a `fn`
            // pointer, a vtable entry) is its original entry, whose site
            // leads to the live generation: a pointer stored by new code
            // stays valid when this generation is unloaded. Only direct
            // calls go straight to the new code.
            if r_type != R_X86_64_PLT32
                && self.patch.contains(&name)
                && self.exe.contains_key(&name)
                && here.is_some_and(|d| self.set.sym(d).kind == SymKind::Func)
            {
                return Ok((BTarget::Symbol { name }, a));
            }
            let take =
                self.patch.contains(&name) || (here.is_some() && !self.exe.contains_key(&name));
            if let (true, Some(d)) = (take, here) {
                let s = self.set.sym(d).clone();
                if s.kind == SymKind::Tls {
                    return Err(Error::new(
                        E_WATCH_NEW_TLS,
                        format!(
                            "the new code needs the thread-local {}, which the running process does not have",
                            display_name(&name)
                        ),
                    ));
                }
                if !self.patch.contains(&name) && s.kind == SymKind::Func {
                    self.patch.insert(name.clone());
                    self.added.push(name.clone());
                }
                let sec = s.section.unwrap_or(0);
                let index = self.place(d.obj, sec)?;
                return Ok((
                    BTarget::Section {
                        index,
                        offset: s.value,
                    },
                    a,
                ));
            }
            return Ok((BTarget::Symbol { name }, a));
        }
        let s = self.set.objs[obj].symbols[sym].clone();
        match s.section {
            Some(sec) => {
                let index = self.place(obj, sec)?;
                Ok((
                    BTarget::Section {
                        index,
                        offset: s.value,
                    },
                    addend,
                ))
            }
            None => Ok((BTarget::Symbol { name: s.name }, addend)),
        }
    }
}

/// Builds the patch for `changed` functions of the new build `set`.
/// `exe` holds the symbols the running executable defines: a reference to one
/// of them resolves to the process's copy (state kept); one it lacks comes
/// along from the new build.
///
/// # Errors
/// `E_WATCH_NEW_TLS`, `E_WATCH_BAD_BUNDLE`.
pub fn build(
    set: &ObjSet,
    changed: &[String],
    exe: &HashMap<String, ExeSym>,
    build_id: &str,
) -> Result<Bundle> {
    let mut b = Builder {
        set,
        exe,
        patch: changed.iter().cloned().collect(),
        placed: HashMap::new(),
        sections: Vec::new(),
        queue: Vec::new(),
        added: Vec::new(),
    };
    let mut functions = Vec::new();
    for name in changed {
        let Some(d) = set.defs.get(name).copied() else {
            continue;
        };
        if !exe.contains_key(name) {
            // Not linked into the process (unused there): nothing calls it.
            continue;
        }
        let s = set.sym(d).clone();
        let section = b.place(d.obj, s.section.unwrap_or(0))?;
        functions.push(BFunc {
            name: name.clone(),
            display: display_name(name),
            section,
            offset: s.value,
        });
    }
    b.drain()?;
    // The unwind info of the code placed; what it refers to (LSDAs) comes
    // along too.
    let eh_frame = b.eh_frame()?;
    b.drain()?;
    let debug = debug_of(set, &b.placed);
    Ok(Bundle {
        build_id: build_id.to_owned(),
        sections: b.sections,
        functions,
        added: b.added,
        debug,
        eh_frame,
    })
}

const R_X86_64_PC32: u32 = 2;

impl Builder<'_> {
    /// Resolves the relocations of every placed section not yet done
    /// (placing what they reach).
    fn drain(&mut self) -> Result<()> {
        let set = self.set;
        while let Some((obj, sec)) = self.queue.pop() {
            let idx = self.placed[&(obj, sec)];
            let relocs = set.objs[obj].sections[sec]
                .as_ref()
                .map(|s| s.relocs.clone())
                .unwrap_or_default();
            let mut out = Vec::with_capacity(relocs.len());
            for r in relocs {
                let (target, addend) = self.resolve(obj, r.sym, r.addend, r.r_type)?;
                out.push(BRel {
                    offset: r.offset,
                    r_type: r.r_type,
                    target,
                    addend,
                });
            }
            self.sections[idx].relocs = out;
        }
        Ok(())
    }

    /// One `.eh_frame` for the placed code: from each object's `.eh_frame`,
    /// the FDEs whose `pc_begin` names a placed code section, each after
    /// its CIE (copied once), zero-terminated. The FDEs' relocations point
    /// at the new code itself (never at the process's original entry, as a
    /// function's address taken as a value would); the others (the CIE's
    /// personality, the FDE's LSDA) resolve like the code's. An object
    /// whose `.eh_frame` does not parse contributes none (its code then has
    /// no unwind info: a panic through it aborts, as before).
    fn eh_frame(&mut self) -> Result<Option<BEhFrame>> {
        let set = self.set;
        let objs = code_objects(set, &self.placed);
        let mut out: Vec<u8> = Vec::new();
        let mut relocs: Vec<BRel> = Vec::new();
        let mut first: Option<(usize, u64)> = None;
        for oi in objs {
            let o = &set.objs[oi];
            let Some(eh) = o
                .sections
                .iter()
                .flatten()
                .find(|s| s.name == ".eh_frame" && !s.data.is_empty())
            else {
                continue;
            };
            let Some(records) = eh_records(&eh.data) else {
                continue;
            };
            let ends: HashMap<usize, usize> = records.iter().map(|r| (r.0, r.1)).collect();
            let mut cie_at: HashMap<usize, usize> = HashMap::new();
            for (off, end, cie) in records {
                let Some(cie) = cie else { continue };
                // pc_begin: the first field after the CIE pointer.
                let Some(pc) = eh.relocs.iter().find(|r| r.offset == off as u64 + 8) else {
                    continue;
                };
                let Some(target) = o.symbols.get(pc.sym) else {
                    continue;
                };
                let Some(&index) = target.section.and_then(|sec| self.placed.get(&(oi, sec)))
                else {
                    continue;
                };
                if self.sections[index].kind != SecKind::Code || pc.r_type != R_X86_64_PC32 {
                    continue;
                }
                let Some(&cie_end) = ends.get(&cie) else {
                    // Not the start of a record: not an FDE we can copy.
                    continue;
                };
                let new_cie = match cie_at.get(&cie) {
                    Some(&n) => n,
                    None => {
                        let n = out.len();
                        let range = (cie, cie_end);
                        self.copy_record(
                            oi,
                            &eh.data,
                            &eh.relocs,
                            range,
                            &mut out,
                            &mut relocs,
                            None,
                        )?;
                        cie_at.insert(cie, n);
                        n
                    }
                };
                let new_fde = out.len();
                let pc_target = BTarget::Section {
                    index,
                    offset: target.value,
                };
                self.copy_record(
                    oi,
                    &eh.data,
                    &eh.relocs,
                    (off, end),
                    &mut out,
                    &mut relocs,
                    Some((off + 8, pc_target)),
                )?;
                let ptr = (new_fde + 4 - new_cie) as u32;
                out[new_fde + 4..new_fde + 8].copy_from_slice(&ptr.to_le_bytes());
                let start = (index, (target.value as i64 + pc.addend) as u64);
                if first.is_none_or(|f| start < f) {
                    first = Some(start);
                }
            }
        }
        let Some((code, offset)) = first else {
            return Ok(None);
        };
        out.extend_from_slice(&[0; 4]);
        let section = self.sections.len();
        self.sections.push(BSec {
            name: ".eh_frame".to_owned(),
            kind: SecKind::ReadOnly,
            align: 8,
            size: out.len() as u64,
            hex: hex(&out),
            relocs,
            function: None,
            symbols: Vec::new(),
        });
        Ok(Some(BEhFrame {
            section,
            code,
            offset,
        }))
    }

    /// Appends the record `range` of an object's `.eh_frame` to `out`, and
    /// its relocations (rebased) to `relocs`; `fixed` names the target of
    /// the relocation at that offset instead of resolving it.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site per kind of record"
    )]
    fn copy_record(
        &mut self,
        obj: usize,
        data: &[u8],
        rels: &[crate::objects::Rel],
        (from, to): (usize, usize),
        out: &mut Vec<u8>,
        relocs: &mut Vec<BRel>,
        fixed: Option<(usize, BTarget)>,
    ) -> Result<()> {
        let base = out.len();
        out.extend_from_slice(&data[from..to]);
        for r in rels {
            let at = r.offset as usize;
            if at < from || at >= to {
                continue;
            }
            let (target, addend) = match &fixed {
                Some((f, t)) if *f == at => (t.clone(), r.addend),
                _ => self.resolve(obj, r.sym, r.addend, r.r_type)?,
            };
            relocs.push(BRel {
                offset: (base + at - from) as u64,
                r_type: r.r_type,
                target,
                addend,
            });
        }
        Ok(())
    }
}

/// The objects the patch takes code from (sorted).
fn code_objects(set: &ObjSet, placed: &HashMap<(usize, usize), usize>) -> Vec<usize> {
    let mut objs: Vec<usize> = placed
        .keys()
        .filter(|(o, s)| {
            set.objs[*o]
                .sections
                .get(*s)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.kind == SecKind::Code)
        })
        .map(|(o, _)| *o)
        .collect();
    objs.sort_unstable();
    objs.dedup();
    objs
}

/// The records of an `.eh_frame` section: `(start, end, cie)` with `cie`
/// the start of an FDE's CIE (`None` for a CIE). `None` when it does not
/// parse (or uses 64-bit lengths, which LLVM does not emit).
fn eh_records(d: &[u8]) -> Option<Vec<(usize, usize, Option<usize>)>> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?))
    };
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= d.len() {
        let len = word(off)? as usize;
        if len == 0 {
            break;
        }
        if len == 0xffff_ffff || len < 4 {
            return None;
        }
        let end = off.checked_add(4 + len).filter(|e| *e <= d.len())?;
        let id = word(off + 4)? as usize;
        let cie = if id == 0 {
            None
        } else {
            Some((off + 4).checked_sub(id)?)
        };
        out.push((off, end, cie));
        off = end;
    }
    Some(out)
}

/// The debug sections of every object the patch takes code from, their
/// relocations resolved to patch sections, other debug sections of the
/// same object, or nothing. Best effort: an object whose debug sections do
/// not read contributes none (its code is then named by the symbol table
/// only).
fn debug_of(set: &ObjSet, placed: &HashMap<(usize, usize), usize>) -> Vec<BDebug> {
    let objs = code_objects(set, placed);
    let mut out = Vec::new();
    for oi in objs {
        let o = &set.objs[oi];
        let Ok(secs) = crate::objects::read_debug(&o.path) else {
            continue;
        };
        let names: HashMap<usize, &str> = secs.iter().map(|d| (d.index, d.name.as_str())).collect();
        let sections = secs
            .iter()
            .map(|d| BDebugSec {
                name: d.name.clone(),
                hex: hex(&d.data),
                relocs: d
                    .relocs
                    .iter()
                    .map(|r| {
                        let sym = o.symbols.get(r.sym);
                        let (target, addend) = match sym {
                            Some(s) => match s.section {
                                Some(sec) if names.contains_key(&sec) => (
                                    DTarget::Debug {
                                        name: names[&sec].to_owned(),
                                    },
                                    r.addend + s.value as i64,
                                ),
                                Some(sec) if placed.contains_key(&(oi, sec)) => (
                                    DTarget::Section {
                                        index: placed[&(oi, sec)],
                                        offset: s.value,
                                    },
                                    r.addend,
                                ),
                                _ if s.kind == SymKind::Tls && s.is_named() => (
                                    DTarget::Tls {
                                        name: s.name.clone(),
                                    },
                                    r.addend,
                                ),
                                _ => (DTarget::Absent, r.addend),
                            },
                            None => (DTarget::Absent, r.addend),
                        };
                        BDebugRel {
                            offset: r.offset,
                            r_type: r.r_type,
                            target,
                            addend,
                        }
                    })
                    .collect(),
            })
            .collect();
        out.push(BDebug {
            object: o.path.display().to_string(),
            sections,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::eh_records;

    fn record(id: u32, body: &[u8]) -> Vec<u8> {
        let mut r = ((body.len() + 4) as u32).to_le_bytes().to_vec();
        r.extend_from_slice(&id.to_le_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn eh_frame_records_and_their_cies() {
        // CIE at 0 (16 bytes), FDE at 16 pointing back to it, terminator.
        let mut d = record(0, &[1; 8]);
        let fde_at = d.len();
        d.extend(record((fde_at + 4) as u32, &[2; 12]));
        d.extend_from_slice(&[0; 4]);
        assert_eq!(eh_records(&d).unwrap(), [(0, 16, None), (16, 36, Some(0))]);
        // A length past the end, a CIE pointer before the section, the
        // 64-bit form: not parsed (the object contributes no unwind info).
        let mut long = d.clone();
        long[0] = 200;
        assert!(eh_records(&long).is_none());
        let mut back = d.clone();
        back[fde_at + 4..fde_at + 8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(eh_records(&back).is_none());
        let mut wide = d;
        wide[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(eh_records(&wide).is_none());
        // Empty, or only a terminator: no records.
        assert_eq!(eh_records(&[]).unwrap(), []);
        assert_eq!(eh_records(&[0; 4]).unwrap(), []);
    }
}
