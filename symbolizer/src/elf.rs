//! ELF files: mapping, classification of bad input, layout, build-id,
//! debuglink and symbol tables.
//!
//! Parsing goes through `object`, whose reads are all bounds-checked: a
//! truncated or corrupted file yields an [`Error`], never a panic.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use object::elf;
use object::read::elf::{ElfFile64, ProgramHeader as _};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

use crate::addr::{FileOffset, FileVirtAddr};
use crate::error::{Error, Result};
use crate::model::{BuildId, Segment, TlsInfo, TlsSegment};

/// What distinguishes one version of a file's bytes from another without
/// reading them: the inode and what a rewrite changes (size, mtime). A file
/// replaced by a rebuild gets a new inode; one rewritten in place keeps the
/// inode but not its mtime.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub(crate) struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
}

impl FileIdentity {
    /// The identity `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt as _;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// A file mapped read-only. Its bytes never move while it lives.
#[derive(Debug)]
pub(crate) struct Mapped {
    pub path: PathBuf,
    /// The identity of the file when it was opened (`None` for bytes that
    /// did not come from a file).
    pub identity: Option<FileIdentity>,
    map: Option<Mmap>,
    owned: Option<Box<[u8]>>,
}

impl Mapped {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Arc<Mapped>> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let identity = Some(FileIdentity::of(&meta));
        if meta.len() == 0 {
            return Ok(Arc::new(Mapped {
                path: path.to_path_buf(),
                identity,
                map: None,
                owned: None,
            }));
        }
        // SAFETY: the map is read-only and private to this process. Another
        // process truncating the file while it is mapped would make reads
        // fault (SIGBUS); that is the documented limit of every mmap-based
        // symbolizer (SAFETY.md, symbolizer), not a Rust aliasing issue: the
        // bytes are only ever read through shared slices.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Ok(Arc::new(Mapped {
            path: path.to_path_buf(),
            identity,
            map: Some(map),
            owned: None,
        }))
    }

    /// Wraps bytes already in memory (tests, fuzzing, files read by other
    /// means). A boxed slice's bytes never move either.
    pub fn from_bytes(path: PathBuf, bytes: Vec<u8>) -> Arc<Mapped> {
        Arc::new(Mapped {
            path,
            identity: None,
            map: None,
            owned: Some(bytes.into_boxed_slice()),
        })
    }

    /// The file's bytes.
    pub fn data(&self) -> &[u8] {
        match (&self.map, &self.owned) {
            (Some(m), _) => m,
            (None, Some(b)) => b,
            (None, None) => &[],
        }
    }
}

/// The parsed ELF type used throughout.
pub(crate) type Elf<'d> = ElfFile64<'d, object::Endianness>;

/// Parses `data` as ELF64, classifying failures.
pub(crate) fn parse<'d>(path: &Path, data: &'d [u8]) -> Result<Elf<'d>> {
    if data.len() < 4 || data[..4] != elf::ELFMAG[..] {
        return Err(Error::NotElf {
            path: path.to_path_buf(),
            reason: "bad magic".into(),
        });
    }
    if data.len() < 5 || data[4] != elf::ELFCLASS64 {
        return Err(Error::NotElf {
            path: path.to_path_buf(),
            reason: "not a 64-bit ELF file".into(),
        });
    }
    Elf::parse(data).map_err(|e| Error::Truncated {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Program-header facts about a file.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub segments: Vec<Segment>,
    pub tls: Option<TlsInfo>,
    pub build_id: Option<BuildId>,
}

/// Reads the `PT_LOAD`/`PT_TLS` headers and the build-id of a mapped file.
pub(crate) fn file_layout(mapped: &Mapped) -> Result<Layout> {
    let path = &mapped.path;
    let file = parse(path, mapped.data())?;
    let endian = file.endian();
    let mut segments = Vec::new();
    let mut tls = None;
    for ph in file.elf_program_headers() {
        match ph.p_type(endian) {
            elf::PT_LOAD => segments.push(Segment {
                vaddr: FileVirtAddr(ph.p_vaddr(endian)),
                memsz: ph.p_memsz(endian),
                offset: FileOffset(ph.p_offset(endian)),
                filesz: ph.p_filesz(endian),
                flags: ph.p_flags(endian),
            }),
            elf::PT_TLS => {
                tls = Some(TlsInfo {
                    modid: 0,
                    segment: TlsSegment {
                        image: ph.p_vaddr(endian),
                        filesz: ph.p_filesz(endian),
                        memsz: ph.p_memsz(endian),
                        align: ph.p_align(endian),
                    },
                })
            }
            _ => {}
        }
    }
    Ok(Layout {
        segments,
        tls,
        build_id: build_id(&file),
    })
}

/// `[start, end)` file virtual ranges of the executable `PT_LOAD` segments.
pub(crate) fn exec_ranges(file: &Elf<'_>) -> Vec<(u64, u64)> {
    let endian = file.endian();
    file.elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_LOAD && ph.p_flags(endian) & elf::PF_X != 0)
        .map(|ph| {
            let start = ph.p_vaddr(endian);
            (start, start.saturating_add(ph.p_memsz(endian)))
        })
        .collect()
}

/// The file's `NT_GNU_BUILD_ID`, if any (a malformed note counts as none).
pub(crate) fn build_id(file: &Elf<'_>) -> Option<BuildId> {
    file.build_id().ok().flatten().map(|b| BuildId(b.to_vec()))
}

/// The file's `.gnu_debuglink`: file name and CRC32.
pub(crate) fn debuglink(file: &Elf<'_>) -> Option<(String, u32)> {
    let (name, crc) = file.gnu_debuglink().ok().flatten()?;
    Some((String::from_utf8_lossy(name).into_owned(), crc))
}

/// Whether the file carries DWARF line or unit information.
pub(crate) fn has_dwarf(file: &Elf<'_>) -> bool {
    [".debug_info", ".debug_line", ".zdebug_info"]
        .iter()
        .any(|n| {
            file.section_by_name(n)
                .is_some_and(|s| s.kind() != object::SectionKind::UninitializedData && s.size() > 0)
        })
}

/// A section's (decompressed) bytes, or empty when absent or unreadable.
pub(crate) fn section<'d>(file: &Elf<'d>, name: &str) -> Cow<'d, [u8]> {
    file.section_by_name(name)
        .filter(|s| s.kind() != object::SectionKind::UninitializedData)
        .and_then(|s| s.uncompressed_data().ok())
        .unwrap_or(Cow::Borrowed(&[]))
}

/// A symbol from `.symtab` or `.dynsym`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Symbol {
    /// The raw (mangled) name.
    pub name: String,
    /// Its file virtual address.
    pub addr: FileVirtAddr,
    /// `st_size` (0 when unknown).
    pub size: u64,
    /// Whether it is a local (`STB_LOCAL`) symbol.
    pub local: bool,
    /// Whether it is a function (`STT_FUNC`/`STT_GNU_IFUNC`).
    pub func: bool,
    /// The `STT_FILE` symbol it belongs to (the source or codegen-unit
    /// name), by the rule binutils applies: the last `STT_FILE` before it,
    /// except for a global symbol after a later file symbol.
    pub file: Option<Arc<str>>,
}

/// The defined symbols of one or more files, sorted by address.
#[derive(Debug, Default)]
pub(crate) struct SymbolTable {
    syms: Vec<Symbol>,
    seen: std::collections::HashSet<(u64, String)>,
}

impl SymbolTable {
    /// Adds `.symtab` and `.dynsym` of `file` (a symbol already present is
    /// skipped).
    pub fn add(&mut self, file: &Elf<'_>) {
        for table in [file.symbols(), file.dynamic_symbols()] {
            // binutils' elf_find_function state machine for STT_FILE.
            let mut current: Option<Arc<str>> = None;
            let mut symbol_seen = false;
            let mut file_after_symbol = false;
            for sym in table {
                if sym.kind() == SymbolKind::File {
                    current = sym.name().ok().map(Arc::from);
                    file_after_symbol |= symbol_seen;
                    continue;
                }
                if !sym.is_definition() || sym.address() == 0 {
                    continue;
                }
                let func = sym.kind() == SymbolKind::Text;
                if !func && sym.kind() != SymbolKind::Unknown {
                    // Data, sections, TLS: never a code symbol.
                    continue;
                }
                symbol_seen = true;
                let Ok(name) = sym.name() else { continue };
                if name.is_empty() || name.starts_with('$') {
                    continue;
                }
                if !self.seen.insert((sym.address(), name.to_owned())) {
                    continue;
                }
                let file = if !sym.is_local() && file_after_symbol {
                    None
                } else {
                    current.clone()
                };
                self.syms.push(Symbol {
                    name: name.to_owned(),
                    addr: FileVirtAddr(sym.address()),
                    size: sym.size(),
                    local: sym.is_local(),
                    func,
                    file,
                });
            }
        }
    }

    /// Sorts by address, keeping table order among equal addresses.
    pub fn finish(&mut self) {
        self.syms.sort_by_key(|s| s.addr);
        self.seen = Default::default();
    }

    /// The symbol whose `[addr, addr+size)` contains `addr`; among several,
    /// the one starting nearest, then the first in table order (as binutils
    /// picks among aliases, e.g. identical-code-folded functions).
    pub fn containing(&self, addr: FileVirtAddr) -> Option<&Symbol> {
        let idx = self.syms.partition_point(|s| s.addr <= addr);
        // Scanning back over at most 64 candidates covers nested and aliased
        // symbols without a quadratic worst case on hostile tables.
        self.syms[idx.saturating_sub(64)..idx]
            .iter()
            .filter(|s| s.size > 0 && addr.0 - s.addr.0 < s.size)
            .min_by_key(|s| addr.0 - s.addr.0)
    }

    /// Symbols named `name`: the raw name, or the demangled name without
    /// the Rust hash (`crate::module::function`).
    pub fn by_name(&self, name: &str) -> Vec<&Symbol> {
        let exact: Vec<&Symbol> = self.syms.iter().filter(|s| s.name == name).collect();
        if !exact.is_empty() {
            return exact;
        }
        self.syms
            .iter()
            .filter(|s| crate::demangle::demangle(&s.name) == name)
            .collect()
    }
}
