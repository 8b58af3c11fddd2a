//! Relocatable objects (`.o`) of one crate, read into plain data, and the
//! identity of what they define: a function's or a static's bytes with
//! every relocation replaced by *what* it refers to (a symbol's name and
//! addend, or the content of an anonymous constant), never by an address.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionKind, SymbolKind,
};

use crate::error::{E_WATCH_OBJECT, Error, Result, io};

/// What a section holds, as far as a patch cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SecKind {
    /// Executable code.
    Code,
    /// Read-only data, including `.data.rel.ro` (read-only once relocated).
    ReadOnly,
    /// Writable data.
    Data,
    /// Zero-initialized writable data.
    Bss,
    /// Thread-local data (never copied: new thread-locals are refused).
    Tls,
    /// Not loaded (debug info, notes, unwind tables...).
    Other,
}

/// One section of an object.
#[derive(Debug, Clone)]
pub struct Sec {
    /// Its name (`.text.<mangled>` with function sections).
    pub name: String,
    /// What it holds.
    pub kind: SecKind,
    /// Required alignment.
    pub align: u64,
    /// Its size in memory.
    pub size: u64,
    /// Its bytes (empty for `Bss`).
    pub data: Vec<u8>,
    /// Its relocations, by offset.
    pub relocs: Vec<Rel>,
}

/// One relocation (RELA).
#[derive(Debug, Clone, Copy)]
pub struct Rel {
    /// Offset in the section.
    pub offset: u64,
    /// `R_X86_64_*`.
    pub r_type: u32,
    /// Index of the symbol in the object's symbol table.
    pub sym: usize,
    /// The explicit addend.
    pub addend: i64,
}

/// What a symbol is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SymKind {
    /// A function.
    Func,
    /// Data (a static, a constant).
    Data,
    /// A thread-local.
    Tls,
    /// A section symbol.
    Section,
    /// Anything else (file symbols, no type).
    Other,
}

/// One symbol of an object.
#[derive(Debug, Clone)]
pub struct Sym {
    /// Its (mangled) name; empty for section symbols.
    pub name: String,
    /// What it is.
    pub kind: SymKind,
    /// Defining section (None: undefined, absolute, common).
    pub section: Option<usize>,
    /// Offset in its section.
    pub value: u64,
    /// `st_size`.
    pub size: u64,
    /// `STB_LOCAL`.
    pub local: bool,
}

impl Sym {
    /// A name the linked executable keeps in its symbol table and that
    /// other code may refer to: not a section, not assembler-local (`.L…`).
    pub fn is_named(&self) -> bool {
        !self.name.is_empty() && self.kind != SymKind::Section && !self.name.starts_with(".L")
    }
}

/// One object file.
#[derive(Debug, Clone)]
pub struct Obj {
    /// Where it was read from.
    pub path: PathBuf,
    /// Sections by ELF index (`None` for those of no interest: relocation
    /// tables, symbol and string tables).
    pub sections: Vec<Option<Sec>>,
    /// Symbols by ELF index.
    pub symbols: Vec<Sym>,
    /// Per section: the named symbols it defines (index into `symbols`).
    pub named_in: HashMap<usize, Vec<usize>>,
}

/// Where a definition lives in an [`ObjSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Def {
    /// Object index.
    pub obj: usize,
    /// Symbol index in that object.
    pub sym: usize,
}

/// The objects of one crate build.
#[derive(Debug, Clone, Default)]
pub struct ObjSet {
    /// The objects.
    pub objs: Vec<Obj>,
    /// Named definitions by name (the first one wins if a local name is
    /// defined in several codegen units).
    pub defs: HashMap<String, Def>,
}

/// What a relocation refers to, independent of addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A named symbol (defined here or elsewhere), with the addend relative
    /// to it.
    Named(String),
    /// An anonymous section (constant, string, vtable), by content hash.
    Anon(u64),
}

fn read_obj(path: &Path) -> Result<Obj> {
    let bytes = std::fs::read(path).map_err(|e| io(path.display(), e))?;
    let bad = |e: &dyn std::fmt::Display| {
        Error::new(
            E_WATCH_OBJECT,
            format!("{} does not parse: {e}", path.display()),
        )
    };
    let file = object::File::parse(&*bytes).map_err(|e| bad(&e))?;
    let mut sections: Vec<Option<Sec>> = Vec::new();
    for s in file.sections() {
        let idx = s.index().0;
        if sections.len() <= idx {
            sections.resize(idx + 1, None);
        }
        let name = s.name().unwrap_or("").to_owned();
        let sh_flags = match s.flags() {
            object::SectionFlags::Elf { sh_flags } => sh_flags,
            _ => 0,
        };
        let alloc = sh_flags & u64::from(object::elf::SHF_ALLOC) != 0;
        let kind = match s.kind() {
            _ if !alloc => SecKind::Other,
            SectionKind::Text => SecKind::Code,
            SectionKind::Tls | SectionKind::UninitializedTls => SecKind::Tls,
            SectionKind::UninitializedData => SecKind::Bss,
            _ if name.starts_with(".data.rel.ro") => SecKind::ReadOnly,
            SectionKind::Data => SecKind::Data,
            SectionKind::ReadOnlyData
            | SectionKind::ReadOnlyString
            | SectionKind::ReadOnlyDataWithRel => SecKind::ReadOnly,
            SectionKind::Elf(_) | SectionKind::Other
                if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0 =>
            {
                SecKind::Code
            }
            _ if sh_flags & u64::from(object::elf::SHF_WRITE) != 0 => SecKind::Data,
            _ => SecKind::ReadOnly,
        };
        // `.eh_frame` is not placed as it is, but the patch's own unwind
        // info is cut from it ([`crate::bundle`]): its bytes and
        // relocations are kept.
        let eh_frame = name == ".eh_frame";
        if !eh_frame && (name.starts_with(".note") || name == ".comment") {
            sections[idx] = Some(Sec {
                name,
                kind: SecKind::Other,
                align: s.align(),
                size: s.size(),
                data: Vec::new(),
                relocs: Vec::new(),
            });
            continue;
        }
        let kind = if eh_frame { SecKind::Other } else { kind };
        let data = if (kind == SecKind::Other && !eh_frame) || kind == SecKind::Bss {
            Vec::new()
        } else {
            s.data().map_err(|e| bad(&e))?.to_vec()
        };
        let mut relocs = Vec::new();
        if kind != SecKind::Other || eh_frame {
            for (offset, r) in s.relocations() {
                let r_type = match r.flags() {
                    RelocationFlags::Elf { r_type } => r_type,
                    _ => return Err(bad(&"a relocation that is not ELF")),
                };
                let sym = match r.target() {
                    RelocationTarget::Symbol(i) => i.0,
                    _ => return Err(bad(&"a relocation without a symbol")),
                };
                relocs.push(Rel {
                    offset,
                    r_type,
                    sym,
                    addend: r.addend(),
                });
            }
            relocs.sort_by_key(|r| r.offset);
        }
        sections[idx] = Some(Sec {
            name,
            kind,
            align: s.align().max(1),
            size: s.size(),
            data,
            relocs,
        });
    }
    let mut symbols = Vec::new();
    let mut named_in: HashMap<usize, Vec<usize>> = HashMap::new();
    // Index 0 is the null symbol, which `symbols()` skips.
    symbols.push(Sym {
        name: String::new(),
        kind: SymKind::Other,
        section: None,
        value: 0,
        size: 0,
        local: true,
    });
    for s in file.symbols() {
        let idx = s.index().0;
        while symbols.len() < idx {
            symbols.push(symbols[0].clone());
        }
        let kind = match s.kind() {
            SymbolKind::Text => SymKind::Func,
            SymbolKind::Data => SymKind::Data,
            SymbolKind::Tls => SymKind::Tls,
            SymbolKind::Section => SymKind::Section,
            _ => SymKind::Other,
        };
        let section = s.section_index().map(|i| i.0);
        let sym = Sym {
            name: s.name().unwrap_or("").to_owned(),
            kind,
            section,
            value: s.address(),
            size: s.size(),
            local: s.is_local(),
        };
        if let Some(sec) = section {
            if sym.is_named() && matches!(kind, SymKind::Func | SymKind::Data | SymKind::Tls) {
                named_in.entry(sec).or_default().push(idx);
            }
        }
        symbols.push(sym);
    }
    Ok(Obj {
        path: path.to_owned(),
        sections,
        symbols,
        named_in,
    })
}

impl ObjSet {
    /// Reads every `*.o` of `dir` (sorted by name, for a stable order).
    ///
    /// # Errors
    /// `E_WATCH_IO`, `E_WATCH_OBJECT`.
    pub fn read_dir(dir: &Path) -> Result<ObjSet> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir.display(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "o"))
            .collect();
        paths.sort();
        Self::read(&paths)
    }

    /// Reads the given objects.
    ///
    /// # Errors
    /// `E_WATCH_IO`, `E_WATCH_OBJECT`.
    pub fn read(paths: &[PathBuf]) -> Result<ObjSet> {
        let mut set = ObjSet::default();
        for p in paths {
            let obj = read_obj(p)?;
            let oi = set.objs.len();
            for (si, s) in obj.symbols.iter().enumerate() {
                if s.section.is_some()
                    && s.is_named()
                    && matches!(s.kind, SymKind::Func | SymKind::Data | SymKind::Tls)
                {
                    set.defs
                        .entry(s.name.clone())
                        .or_insert(Def { obj: oi, sym: si });
                }
            }
            set.objs.push(obj);
        }
        Ok(set)
    }

    /// The symbol of a definition.
    pub fn sym(&self, d: Def) -> &Sym {
        &self.objs[d.obj].symbols[d.sym]
    }

    /// The section holding a definition.
    pub fn sec_of(&self, d: Def) -> Option<&Sec> {
        let s = self.sym(d);
        self.objs[d.obj].sections.get(s.section?)?.as_ref()
    }

    /// The named symbol a relocation against `sym` + `addend` stands for,
    /// if any: the symbol itself when named, or the one named symbol a
    /// section symbol's section defines. Returns the name and the addend
    /// relative to that symbol.
    pub fn named_target(&self, obj: usize, sym: usize, addend: i64) -> Option<(String, i64)> {
        let o = &self.objs[obj];
        let s = o.symbols.get(sym)?;
        if s.is_named() {
            return Some((s.name.clone(), addend));
        }
        let sec = s.section?;
        let named = o.named_in.get(&sec)?;
        if named.len() != 1 {
            return None;
        }
        let n = &o.symbols[named[0]];
        Some((n.name.clone(), addend + s.value as i64 - n.value as i64))
    }

    /// The identity of what `sym` + `addend` in object `obj` refers to.
    pub fn target(&self, obj: usize, sym: usize, addend: i64, depth: u32) -> (Target, i64) {
        if let Some((n, a)) = self.named_target(obj, sym, addend) {
            return (Target::Named(n), a);
        }
        let o = &self.objs[obj];
        let s = &o.symbols[sym];
        match s.section {
            Some(sec) => (
                Target::Anon(self.section_hash(obj, sec, depth + 1)),
                addend + s.value as i64,
            ),
            None => (Target::Named(s.name.clone()), addend),
        }
    }

    /// A hash of a section's kind, size, bytes and relocations (by target
    /// identity): equal for equal content in two builds.
    pub fn section_hash(&self, obj: usize, sec: usize, depth: u32) -> u64 {
        let mut h = DefaultHasher::new();
        let Some(s) = self.objs[obj].sections.get(sec).and_then(Option::as_ref) else {
            return 0;
        };
        s.kind.hash(&mut h);
        s.size.hash(&mut h);
        s.data.hash(&mut h);
        if depth > 8 {
            // Anonymous data referring to anonymous data eight levels deep:
            // stop following (cycles); the bytes above still count.
            return h.finish();
        }
        for r in &s.relocs {
            r.offset.hash(&mut h);
            r.r_type.hash(&mut h);
            self.target(obj, r.sym, r.addend, depth).hash(&mut h);
        }
        h.finish()
    }

    /// The identity of a named definition: its section's content (from the
    /// symbol's offset) — equal when the function or static would behave
    /// the same. `None` when not defined here.
    pub fn identity(&self, name: &str) -> Option<u64> {
        let d = *self.defs.get(name)?;
        let s = self.sym(d);
        let mut h = DefaultHasher::new();
        s.value.hash(&mut h);
        s.size.hash(&mut h);
        self.section_hash(d.obj, s.section?, 0).hash(&mut h);
        Some(h.finish())
    }
}

/// One `.debug_*` section of an object, with its relocations: what the
/// patch's own DWARF is made of (see [`crate::debug`]).
#[derive(Debug, Clone)]
pub struct DebugSec {
    /// ELF index of the section in its object.
    pub index: usize,
    /// Its name (`.debug_info`, `.debug_line`...).
    pub name: String,
    /// Its bytes.
    pub data: Vec<u8>,
    /// Its relocations (symbol indexes into the object's symbol table).
    pub relocs: Vec<Rel>,
}

/// The `.debug_*` sections of the object at `path` (read again, only when
/// a patch takes code from it: the diff itself never needs them).
///
/// # Errors
/// `E_WATCH_IO`, `E_WATCH_OBJECT`.
pub fn read_debug(path: &Path) -> Result<Vec<DebugSec>> {
    let bytes = std::fs::read(path).map_err(|e| io(path.display(), e))?;
    let bad = |e: &dyn std::fmt::Display| {
        Error::new(
            E_WATCH_OBJECT,
            format!("{} does not parse: {e}", path.display()),
        )
    };
    let file = object::File::parse(&*bytes).map_err(|e| bad(&e))?;
    let mut out = Vec::new();
    for s in file.sections() {
        let name = s.name().unwrap_or("");
        if !name.starts_with(".debug_") {
            continue;
        }
        if let object::SectionFlags::Elf { sh_flags } = s.flags() {
            if sh_flags & u64::from(object::elf::SHF_ALLOC) != 0
                || sh_flags & u64::from(object::elf::SHF_COMPRESSED) != 0
            {
                continue;
            }
        }
        let data = s.data().map_err(|e| bad(&e))?.to_vec();
        let mut relocs = Vec::new();
        for (offset, r) in s.relocations() {
            let (RelocationFlags::Elf { r_type }, RelocationTarget::Symbol(i)) =
                (r.flags(), r.target())
            else {
                return Err(bad(&"a debug relocation that is not ELF with a symbol"));
            };
            relocs.push(Rel {
                offset,
                r_type,
                sym: i.0,
                addend: r.addend(),
            });
        }
        out.push(DebugSec {
            index: s.index().0,
            name: name.to_owned(),
            data,
            relocs,
        });
    }
    Ok(out)
}
