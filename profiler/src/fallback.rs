//! Names for code the symbolizer leaves without one: PLT stubs and code under
//! size-0 symbols.
//!
//! The symbolizer names an address from DWARF or from a symbol whose
//! `[st_value, st_value + st_size)` covers it. Two kinds of code in every
//! shared object have neither, and samples land there whenever a module is
//! loaded or unloaded under the profiler:
//!
//! * PLT stubs (`.plt`, `.plt.sec`): no symbol at all. Named `target@plt`,
//!   as objdump and perf write them, from the `R_X86_64_JUMP_SLOT`
//!   relocations, whose order is the stubs' order.
//! * crt code under size-0 symbols (`_init`, `_fini`,
//!   `__do_global_dtors_aux`, run by `dlclose`): named after the nearest
//!   preceding function symbol when no other symbol starts in between.
//!
//! Runs at resolution time, off the sampling path; files are read once per
//! report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationTarget};

/// `R_X86_64_JUMP_SLOT`.
const JUMP_SLOT: u32 = 7;
/// Size of one x86-64 PLT entry (and of the `.plt` header, PLT0).
const PLT_ENTRY: u64 = 16;

/// The names one file can give.
#[derive(Debug, Default)]
struct Names {
    /// `(start, end, entries before the first stub, stub targets in order)`.
    plt: Vec<(u64, u64, u64, Vec<String>)>,
    /// Function symbols by address: `(address, size, name)`.
    functions: Vec<(u64, u64, String)>,
    /// Executable sections: `(start, end)`.
    sections: Vec<(u64, u64)>,
}

impl Names {
    fn read(path: &Path) -> Option<Names> {
        let data = std::fs::read(path).ok()?;
        let elf = object::File::parse(&*data).ok()?;
        let mut targets = Vec::new();
        if let (Some(relocs), Some(dynsym)) =
            (elf.dynamic_relocations(), elf.dynamic_symbol_table())
        {
            for (_, r) in relocs {
                let object::RelocationFlags::Elf { r_type } = r.flags() else {
                    continue;
                };
                if r_type != JUMP_SLOT {
                    continue;
                }
                let name = match r.target() {
                    RelocationTarget::Symbol(i) => dynsym
                        .symbol_by_index(i)
                        .ok()
                        .and_then(|s| s.name().ok().map(str::to_owned)),
                    _ => None,
                };
                targets.push(name.unwrap_or_else(|| String::from("??")));
            }
        }
        let mut names = Names::default();
        for s in elf.sections() {
            let (start, end) = (s.address(), s.address() + s.size());
            match s.name() {
                // With IBT, `.plt.sec` holds the stubs callers jump to and
                // `.plt` only lazy-binding entries after PLT0; both in
                // relocation order.
                Ok(".plt.sec") => names.plt.push((start, end, 0, targets.clone())),
                Ok(".plt") => names.plt.push((start, end, 1, targets.clone())),
                _ => {}
            }
            if matches!(s.kind(), object::SectionKind::Text) {
                names.sections.push((start, end));
            }
        }
        names.functions = elf
            .symbols()
            .chain(elf.dynamic_symbols())
            .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_owned())))
            .collect();
        names.functions.sort();
        Some(names)
    }

    fn name(&self, vaddr: u64) -> Option<String> {
        for (start, end, header, targets) in &self.plt {
            if (*start..*end).contains(&vaddr) {
                let slot = (vaddr - start) / PLT_ENTRY;
                return Some(match slot.checked_sub(*header) {
                    Some(i) => match targets.get(i as usize) {
                        Some(t) => format!("{t}@plt"),
                        None => String::from("[plt]"),
                    },
                    None => String::from("[plt]"),
                });
            }
        }
        let &(sec_start, sec_end) = self
            .sections
            .iter()
            .find(|(s, e)| (*s..*e).contains(&vaddr))?;
        let i = self.functions.partition_point(|f| f.0 <= vaddr);
        let (addr, size, name) = self.functions.get(i.checked_sub(1)?)?;
        // A sized symbol that does not reach `vaddr` is not its function; a
        // size-0 one is, up to the next symbol or the section's end.
        let next = self.functions.get(i).map_or(sec_end, |f| f.0.min(sec_end));
        (*size == 0 && *addr >= sec_start && vaddr < next).then(|| name.clone())
    }
}

/// Reads each file once.
#[derive(Debug, Default)]
pub(crate) struct Fallback {
    files: HashMap<PathBuf, Option<Names>>,
}

impl Fallback {
    /// A name for file virtual address `vaddr` of the ELF file at `path`,
    /// when it is a PLT stub or lies under a size-0 function symbol.
    pub(crate) fn name(&mut self, path: &Path, vaddr: u64) -> Option<String> {
        if !self.files.contains_key(path) {
            self.files.insert(path.to_owned(), Names::read(path));
        }
        self.files.get(path)?.as_ref()?.name(vaddr)
    }
}

#[cfg(test)]
mod tests {
    use super::Names;

    #[test]
    fn plt_stubs_and_size_zero_symbols() {
        let names = Names {
            plt: vec![(0x1000, 0x1040, 1, vec!["malloc".into(), "free".into()])],
            functions: vec![
                (0x2000, 0, "_init".into()),
                (0x2020, 0, "__do_global_dtors_aux".into()),
                (0x2040, 0x10, "sized".into()),
            ],
            sections: vec![(0x2000, 0x2100)],
        };
        assert_eq!(names.name(0x1004).as_deref(), Some("[plt]"));
        assert_eq!(names.name(0x1010).as_deref(), Some("malloc@plt"));
        assert_eq!(names.name(0x102b).as_deref(), Some("free@plt"));
        assert_eq!(names.name(0x1030).as_deref(), Some("[plt]"));
        assert_eq!(names.name(0x2010).as_deref(), Some("_init"));
        assert_eq!(names.name(0x2036).as_deref(), Some("__do_global_dtors_aux"));
        // Past a sized symbol's end: not guessed.
        assert_eq!(names.name(0x2058), None);
        // Outside any executable section.
        assert_eq!(names.name(0x3000), None);
    }
}
