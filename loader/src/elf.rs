//! What the loader checks in a file's ELF structures before `dlopen`,
//! read with the `object` crate's low-level ELF types through a
//! [`ReadCache`](object::read::ReadCache) over the open file: only the
//! structures needed are read (no buffer the size of the file), and every
//! read is bounded by the file's length.
//!
//! Beyond parsing, it checks that what `ld.so` and the loader will rely on
//! lies inside the file: each `PT_LOAD`'s file bytes, each section with
//! data, the dynamic table's addresses, the dynamic relocations' targets
//! and the defined dynamic symbols. A file that fails is refused before
//! `dlopen`; mapping a segment past the end of the file would fault
//! (`SIGBUS`) on first touch instead.

use std::fmt;

use object::LittleEndian as LE;
use object::elf::{self, FileHeader64, ProgramHeader64};
use object::read::ReadRef;
use object::read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _, Rela as _, Sym as _};

/// `DF_STATIC_TLS`: the object uses the static TLS model (initial-exec).
pub(crate) const DF_STATIC_TLS: u64 = 0x10;
/// `DF_1_NODELETE`: `dlclose` never unmaps the object.
pub(crate) const DF_1_NODELETE: u64 = 0x8;

/// The largest single table (dynamic symbols, strings, relocations) the
/// loader reads from a file: far above what a plugin has (a Rust `cdylib`
/// exporting thousands of symbols has a few hundred KiB), and a bound on
/// what a crafted size field can make it allocate.
pub(crate) const MAX_TABLE: u64 = 64 << 20;

/// Why the bytes are not an ELF file this loader can take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ElfError {
    /// No ELF magic, or a malformed structure.
    NotElf(String),
    /// An ELF file for another class, byte order or machine.
    WrongArch(String),
    /// A structure lies (partly) past the end of the file.
    Truncated(String),
}

/// The `PT_TLS` segment of a module: the OS layer's one type, shared with
/// the symbolizer's registry.
pub use hotpatch_sys::phdr::TlsSegment;

/// A symbol the object defines in `.dynsym`.
#[derive(Debug, Clone)]
pub(crate) struct DynSym {
    pub name: String,
    pub value: u64,
    pub kind: u8,
}

/// What the loader learned from a file's ELF structures.
#[derive(Clone, Default)]
pub(crate) struct ElfInfo {
    pub tls: Option<TlsSegment>,
    pub needed: Vec<String>,
    pub soname: Option<String>,
    pub rpath: Option<String>,
    pub runpath: Option<String>,
    pub flags: u64,
    pub flags_1: u64,
    /// Dynamic symbols defined by the object.
    pub defined: Vec<DynSym>,
    /// Dynamic symbols the object imports.
    pub imported: Vec<String>,
    /// File range of the section named by the caller, if present.
    pub section: Option<(u64, u64)>,
    /// `[lowest p_vaddr, highest p_vaddr + p_memsz)` over the `PT_LOAD`s.
    pub load_range: Option<(u64, u64)>,
    /// `[p_vaddr, p_vaddr + p_filesz)` of the executable `PT_LOAD`s.
    pub exec: Vec<(u64, u64)>,
    /// `(address, size)` of the dynamic relocation tables.
    pub relocs: Vec<(u64, u64)>,
    /// The highest symbol index a dynamic relocation names.
    pub max_reloc_sym: u32,
}

impl fmt::Debug for ElfInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElfInfo")
            .field("tls", &self.tls)
            .field("needed", &self.needed)
            .field("soname", &self.soname)
            .field("runpath", &self.runpath)
            .field("flags", &self.flags)
            .field("flags_1", &self.flags_1)
            .field("defined", &self.defined.len())
            .finish_non_exhaustive()
    }
}

impl ElfInfo {
    /// Whether `name` is a function defined in an executable segment.
    pub(crate) fn defines_function(&self, name: &str) -> bool {
        self.defined.iter().any(|s| {
            s.name == name
                && s.kind == elf::STT_FUNC
                && self
                    .exec
                    .iter()
                    .any(|&(lo, hi)| s.value >= lo && s.value < hi)
        })
    }

    pub(crate) fn imports(&self, name: &str) -> bool {
        self.imported.iter().any(|s| s == name)
    }
}

fn bad(what: impl fmt::Display) -> ElfError {
    ElfError::NotElf(format!("malformed ELF: {what}"))
}

/// `[off, off + len)` must lie inside a file of `file_len` bytes.
fn in_file(what: impl fmt::Display, off: u64, len: u64, file_len: u64) -> Result<(), ElfError> {
    match off.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        Some(end) => Err(ElfError::Truncated(format!(
            "{what} ends at byte {end}, past the end of the {file_len}-byte file"
        ))),
        None => Err(bad(format_args!(
            "{what}: offset {off:#x} + size {len:#x} overflows"
        ))),
    }
}

/// A `PT_LOAD` segment, in the file and in memory (unrelocated).
#[derive(Clone, Copy)]
struct Load {
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

impl Load {
    /// Whether `[vaddr, vaddr + len)` is inside the segment's file bytes.
    fn holds_file(&self, vaddr: u64, len: u64) -> bool {
        vaddr >= self.vaddr
            && vaddr
                .checked_add(len)
                .is_some_and(|end| end <= self.vaddr + self.filesz)
    }
    /// Whether `[vaddr, vaddr + len)` is inside the segment's memory.
    fn holds_mem(&self, vaddr: u64, len: u64) -> bool {
        vaddr >= self.vaddr
            && vaddr
                .checked_add(len)
                .is_some_and(|end| end <= self.vaddr + self.memsz)
    }
}

/// File offset of `[vaddr, vaddr + len)`, which must be file bytes of one
/// `PT_LOAD`.
fn file_offset(loads: &[Load], vaddr: u64, len: u64) -> Option<u64> {
    loads
        .iter()
        .find(|l| l.holds_file(vaddr, len))
        .map(|l| l.offset + (vaddr - l.vaddr))
}

/// Parses the file behind `data` (`file_len` bytes) as an x86-64 ELF64
/// shared object, and finds the section named `section` if there is one.
pub(crate) fn parse<'a, R: ReadRef<'a>>(
    data: R,
    file_len: u64,
    section: &str,
) -> Result<ElfInfo, ElfError> {
    let ident = data
        .read_bytes_at(0, file_len.min(16))
        .map_err(|()| bad("unreadable header"))?;
    if ident.len() < 4 || ident[..4] != elf::ELFMAG {
        return Err(ElfError::NotElf(
            "no ELF magic (\\x7fELF) at the start of the file".into(),
        ));
    }
    if ident.len() < 6 {
        return Err(ElfError::Truncated(
            "the file is shorter than an ELF identification".into(),
        ));
    }
    match ident[4] {
        elf::ELFCLASS64 => {}
        elf::ELFCLASS32 => return Err(ElfError::WrongArch("ELFCLASS32 (a 32-bit object)".into())),
        c => return Err(ElfError::NotElf(format!("unknown ELF class {c}"))),
    }
    if ident[5] != elf::ELFDATA2LSB {
        return Err(ElfError::WrongArch("big-endian object".into()));
    }
    if file_len < 64 {
        return Err(ElfError::Truncated(
            "the file is shorter than an ELF64 header".into(),
        ));
    }
    let header = FileHeader64::<LE>::parse(data).map_err(bad)?;
    let endian = header.endian().map_err(bad)?;
    let e_machine = header.e_machine(endian);
    if e_machine != elf::EM_X86_64 {
        return Err(ElfError::WrongArch(format!(
            "e_machine {e_machine} ({}), expected {} (x86-64)",
            machine_name(e_machine),
            elf::EM_X86_64
        )));
    }
    let e_type = header.e_type(endian);
    if e_type != elf::ET_DYN {
        let kind = match e_type {
            elf::ET_REL => "a relocatable object (ET_REL)",
            elf::ET_EXEC => "an executable (ET_EXEC)",
            elf::ET_CORE => "a core dump (ET_CORE)",
            _ => "an unknown ELF type",
        };
        return Err(ElfError::NotElf(format!(
            "{kind}, not a shared object (ET_DYN)"
        )));
    }

    let mut info = ElfInfo::default();
    let phdrs = program_headers(header, endian, data, file_len)?;
    let mut loads = Vec::new();
    for (i, p) in phdrs.iter().enumerate() {
        let (offset, filesz, memsz) = (p.p_offset(endian), p.p_filesz(endian), p.p_memsz(endian));
        match p.p_type(endian) {
            elf::PT_LOAD => {
                in_file(
                    format_args!("PT_LOAD segment {i}"),
                    offset,
                    filesz,
                    file_len,
                )?;
                if filesz > memsz {
                    return Err(bad(format_args!(
                        "PT_LOAD segment {i} has more file bytes than memory"
                    )));
                }
                let vaddr = p.p_vaddr(endian);
                let align = p.p_align(endian);
                if align > 1 && (!align.is_power_of_two() || offset % align != vaddr % align) {
                    return Err(bad(format_args!(
                        "PT_LOAD segment {i}: alignment {align:#x} does not fit its offset and address"
                    )));
                }
                if let Some(prev) = loads.last().map(|l: &Load| l.vaddr + l.memsz) {
                    if vaddr < prev {
                        return Err(bad(format_args!(
                            "PT_LOAD segment {i} overlaps or precedes the one before it"
                        )));
                    }
                }
                let end = vaddr
                    .checked_add(memsz)
                    .ok_or_else(|| bad(format_args!("PT_LOAD segment {i} wraps around")))?;
                info.load_range = Some(match info.load_range {
                    None => (vaddr, end),
                    Some((lo, hi)) => (lo.min(vaddr), hi.max(end)),
                });
                if p.p_flags(endian) & elf::PF_X != 0 {
                    info.exec.push((vaddr, vaddr + filesz));
                }
                loads.push(Load {
                    offset,
                    vaddr,
                    filesz,
                    memsz,
                });
            }
            elf::PT_TLS => {
                in_file("the PT_TLS image", offset, filesz, file_len)?;
                info.tls = Some(TlsSegment {
                    image: p.p_vaddr(endian),
                    filesz,
                    memsz,
                    align: p.p_align(endian),
                });
            }
            elf::PT_DYNAMIC => in_file("the PT_DYNAMIC segment", offset, filesz, file_len)?,
            _ => {}
        }
    }
    if loads.is_empty() {
        return Err(bad("no PT_LOAD segment"));
    }
    if let Some(dynamic) = phdrs.iter().find(|p| p.p_type(endian) == elf::PT_DYNAMIC) {
        read_dynamic(data, endian, &loads, dynamic, &mut info)?;
    }
    read_sections(header, endian, data, file_len, section, &loads, &mut info)?;
    Ok(info)
}

fn program_headers<'a, R: ReadRef<'a>>(
    header: &FileHeader64<LE>,
    endian: LE,
    data: R,
    file_len: u64,
) -> Result<&'a [ProgramHeader64<LE>], ElfError> {
    let phoff = header.e_phoff(endian);
    let phnum = u64::from(header.e_phnum(endian));
    if phnum == 0 {
        return Err(bad("no program headers"));
    }
    if u64::from(header.e_phentsize(endian)) != 56 {
        return Err(bad("program header entry size is not 56"));
    }
    in_file("the program header table", phoff, phnum * 56, file_len)?;
    header.program_headers(endian, data).map_err(bad)
}

/// Dynamic tags whose value is an address of data in the file.
const ADDRESS_TAGS: [(u32, &str); 14] = [
    (elf::DT_PLTGOT, "DT_PLTGOT"),
    (elf::DT_HASH, "DT_HASH"),
    (elf::DT_STRTAB, "DT_STRTAB"),
    (elf::DT_SYMTAB, "DT_SYMTAB"),
    (elf::DT_RELA, "DT_RELA"),
    (elf::DT_INIT, "DT_INIT"),
    (elf::DT_FINI, "DT_FINI"),
    (elf::DT_JMPREL, "DT_JMPREL"),
    (elf::DT_INIT_ARRAY, "DT_INIT_ARRAY"),
    (elf::DT_FINI_ARRAY, "DT_FINI_ARRAY"),
    (elf::DT_GNU_HASH, "DT_GNU_HASH"),
    (elf::DT_VERSYM, "DT_VERSYM"),
    (elf::DT_VERDEF, "DT_VERDEF"),
    (elf::DT_VERNEED, "DT_VERNEED"),
];

/// Tables given by an address and a size tag.
const SIZED_TAGS: [(u32, u32, &str); 5] = [
    (elf::DT_STRTAB, elf::DT_STRSZ, "DT_STRTAB"),
    (elf::DT_RELA, elf::DT_RELASZ, "DT_RELA"),
    (elf::DT_JMPREL, elf::DT_PLTRELSZ, "DT_JMPREL"),
    (elf::DT_INIT_ARRAY, elf::DT_INIT_ARRAYSZ, "DT_INIT_ARRAY"),
    (elf::DT_FINI_ARRAY, elf::DT_FINI_ARRAYSZ, "DT_FINI_ARRAY"),
];

/// Relocation types the dynamic loader applies in an x86-64 object.
const DYNAMIC_RELOCS: [u32; 14] = [
    elf::R_X86_64_NONE,
    elf::R_X86_64_64,
    elf::R_X86_64_PC32,
    elf::R_X86_64_COPY,
    elf::R_X86_64_GLOB_DAT,
    elf::R_X86_64_JUMP_SLOT,
    elf::R_X86_64_RELATIVE,
    elf::R_X86_64_32,
    elf::R_X86_64_DTPMOD64,
    elf::R_X86_64_DTPOFF64,
    elf::R_X86_64_TPOFF64,
    elf::R_X86_64_TLSDESC,
    elf::R_X86_64_IRELATIVE,
    elf::R_X86_64_RELATIVE64,
];

/// Whether `tag` is a dynamic tag of the generic ABI, of GNU or of a
/// processor: anything else is corruption the dynamic loader would skip
/// silently (a flipped bit in `DT_RELA`'s tag drops every relocation).
fn known_tag(tag: u64) -> bool {
    matches!(tag,
        0..=37 // DT_NULL ..= DT_RELRENT
        | 0x6000_000d..=0x6fff_f000 // DT_LOOS ..= DT_HIOS
        | 0x6fff_fd00..=0x6fff_fdff // DT_VALRNGLO ..= DT_VALRNGHI
        | 0x6fff_fe00..=0x6fff_feff // DT_ADDRRNGLO ..= DT_ADDRRNGHI
        | 0x6fff_fff0..=0x6fff_ffff // DT_VERSYM ..= DT_VERNEEDNUM
        | 0x7000_0000..=0x7fff_ffff // DT_LOPROC ..= DT_HIPROC
    )
}

fn read_dynamic<'a, R: ReadRef<'a>>(
    data: R,
    endian: LE,
    loads: &[Load],
    dynamic: &ProgramHeader64<LE>,
    info: &mut ElfInfo,
) -> Result<(), ElfError> {
    if dynamic.p_filesz(endian) > MAX_TABLE {
        return Err(bad("implausibly large dynamic section"));
    }
    let table = dynamic.dynamic(endian, data).map_err(bad)?.unwrap_or(&[]);
    let mut entries = Vec::new();
    for d in table {
        let tag = d.d_tag(endian);
        if tag == u64::from(elf::DT_NULL) {
            break;
        }
        entries.push((tag, d.d_val(endian)));
    }
    for &(tag, _) in &entries {
        if !known_tag(tag) {
            return Err(bad(format_args!(
                "unknown dynamic tag {tag:#x} (the dynamic loader would ignore it)"
            )));
        }
    }
    let find = |t: u32| {
        entries
            .iter()
            .find(|(tag, _)| *tag == u64::from(t))
            .map(|&(_, v)| v)
    };
    for (tag, name) in ADDRESS_TAGS {
        if let Some(addr) = find(tag) {
            if file_offset(loads, addr, 1).is_none() {
                return Err(bad(format_args!(
                    "{name} ({addr:#x}) points outside the file's PT_LOAD segments"
                )));
            }
        }
    }
    for (tag, size_tag, name) in SIZED_TAGS {
        if find(tag).is_some() != find(size_tag).is_some() {
            return Err(bad(format_args!(
                "{name} without its size, or a size without {name}"
            )));
        }
        if let (Some(addr), Some(size)) = (find(tag), find(size_tag)) {
            if size > MAX_TABLE || file_offset(loads, addr, size).is_none() {
                return Err(bad(format_args!(
                    "{name} ({addr:#x}, {size} bytes) does not fit in the file's PT_LOAD segments"
                )));
            }
        }
    }
    // Every relocation must write inside the object's memory.
    for (tag, size_tag, name) in [
        (elf::DT_RELA, elf::DT_RELASZ, "DT_RELA"),
        (elf::DT_JMPREL, elf::DT_PLTRELSZ, "DT_JMPREL"),
    ] {
        let (Some(addr), Some(size)) = (find(tag), find(size_tag)) else {
            continue;
        };
        let off = file_offset(loads, addr, size).ok_or_else(|| bad(name))?;
        let relas: &[elf::Rela64<LE>] = data
            .read_slice_at(off, (size / 24) as usize)
            .map_err(|()| bad(name))?;
        let relative = if tag == elf::DT_RELA {
            find(elf::DT_RELACOUNT).unwrap_or(0)
        } else {
            0
        };
        for (i, r) in relas.iter().enumerate() {
            let at = r.r_offset(endian);
            if !loads.iter().any(|l| l.holds_mem(at, 8)) {
                return Err(bad(format_args!(
                    "a {name} relocation writes at {at:#x}, outside the object"
                )));
            }
            let (kind, sym) = (r.r_type(endian, false), r.r_sym(endian, false));
            if !DYNAMIC_RELOCS.contains(&kind)
                || ((i as u64) < relative && kind != elf::R_X86_64_RELATIVE)
            {
                return Err(bad(format_args!(
                    "{name} relocation {i} has type {kind}, which the dynamic loader does not take here"
                )));
            }
            info.max_reloc_sym = info.max_reloc_sym.max(sym);
        }
    }
    if find(elf::DT_SYMTAB).is_none() || find(elf::DT_STRTAB).is_none() {
        return Err(bad("no DT_SYMTAB or DT_STRTAB"));
    }
    if let Some(n) = find(elf::DT_RELACOUNT) {
        if n > find(elf::DT_RELASZ).unwrap_or(0) / 24 {
            return Err(bad("DT_RELACOUNT exceeds the DT_RELA table"));
        }
    }
    info.relocs = [
        (elf::DT_RELA, elf::DT_RELASZ),
        (elf::DT_JMPREL, elf::DT_PLTRELSZ),
    ]
    .into_iter()
    .filter_map(|(t, sz)| Some((find(t)?, find(sz)?)))
    .collect();
    info.flags = find(elf::DT_FLAGS).unwrap_or(0);
    info.flags_1 = find(elf::DT_FLAGS_1).unwrap_or(0);
    let (Some(strtab), Some(strsz)) = (find(elf::DT_STRTAB), find(elf::DT_STRSZ)) else {
        return Ok(());
    };
    let base = file_offset(loads, strtab, strsz).ok_or_else(|| bad("DT_STRTAB"))?;
    let string = |off: u64| -> Result<String, ElfError> {
        if off >= strsz {
            return Err(bad("dynamic string offset outside DT_STRTAB"));
        }
        let s = data
            .read_bytes_at_until(base + off..base + strsz, 0)
            .map_err(|()| bad("unterminated dynamic string"))?;
        Ok(String::from_utf8_lossy(s).into_owned())
    };
    for &(tag, val) in &entries {
        match u32::try_from(tag) {
            Ok(elf::DT_NEEDED) => info.needed.push(string(val)?),
            Ok(elf::DT_SONAME) => info.soname = Some(string(val)?),
            Ok(elf::DT_RPATH) => info.rpath = Some(string(val)?),
            Ok(elf::DT_RUNPATH) => info.runpath = Some(string(val)?),
            _ => {}
        }
    }
    Ok(())
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the pieces are the parse state"
)]
fn read_sections<'a, R: ReadRef<'a>>(
    header: &FileHeader64<LE>,
    endian: LE,
    data: R,
    file_len: u64,
    wanted: &str,
    loads: &[Load],
    info: &mut ElfInfo,
) -> Result<(), ElfError> {
    let shoff = header.e_shoff(endian);
    if shoff == 0 {
        return Ok(()); // section headers stripped: no descriptor, no dynsym
    }
    if header.e_shentsize(endian) != 64 {
        return Err(bad("section header entry size is not 64"));
    }
    let shnum = header.shnum(endian, data).map_err(bad)? as u64;
    if shnum > 65_536 {
        return Err(bad("implausible section count"));
    }
    in_file("the section header table", shoff, shnum * 64, file_len)?;
    let sections = header.sections(endian, data).map_err(bad)?;
    for s in sections.iter() {
        let sh_type = s.sh_type.get(endian);
        if sh_type == elf::SHT_NOBITS || sh_type == elf::SHT_NULL {
            continue;
        }
        let (off, size) = (s.sh_offset.get(endian), s.sh_size.get(endian));
        let name = sections.section_name(endian, s).unwrap_or(b"?");
        let name = String::from_utf8_lossy(name);
        in_file(format_args!("section {name}"), off, size, file_len)?;
        // An allocated section must be mapped where its header says: if
        // a segment's offset was changed, the code would be other bytes.
        if s.sh_flags.get(endian) & u64::from(elf::SHF_ALLOC) != 0 && size > 0 {
            let addr = s.sh_addr.get(endian);
            if file_offset(loads, addr, size) != Some(off) {
                return Err(bad(format_args!(
                    "section {name} is not mapped at its address by the PT_LOAD segments"
                )));
            }
        }
        if info.section.is_none() && name == wanted {
            info.section = Some((off, size));
        }
        // An allocated relocation section the dynamic table does not
        // point at would never be applied.
        if sh_type == elf::SHT_RELA
            && s.sh_flags.get(endian) & u64::from(elf::SHF_ALLOC) != 0
            && size > 0
        {
            let addr = s.sh_addr.get(endian);
            let covered = info
                .relocs
                .iter()
                .any(|&(a, n)| addr >= a && addr.saturating_add(size) <= a.saturating_add(n));
            if !covered {
                return Err(bad(format_args!(
                    "relocation section {name} is not covered by DT_RELA or DT_JMPREL"
                )));
            }
        }
    }
    let symbols = sections
        .symbols(endian, data, elf::SHT_DYNSYM)
        .map_err(|e| bad(format_args!(".dynsym: {e}")))?;
    if symbols.symbols().len() as u64 * 24 > MAX_TABLE {
        return Err(bad("implausibly large .dynsym"));
    }
    if info.max_reloc_sym as usize >= symbols.symbols().len().max(1) {
        return Err(bad(format_args!(
            "a dynamic relocation names symbol {}, .dynsym has {}",
            info.max_reloc_sym,
            symbols.symbols().len()
        )));
    }
    for sym in symbols.iter().skip(1) {
        let name = symbols
            .symbol_name(endian, sym)
            .map_err(|e| bad(format_args!(".dynsym name: {e}")))?;
        let name = String::from_utf8_lossy(name).into_owned();
        let shndx = sym.st_shndx(endian);
        if shndx == elf::SHN_UNDEF {
            info.imported.push(name);
            continue;
        }
        let (value, kind) = (sym.st_value(endian), sym.st_type());
        let fits = match kind {
            _ if shndx == elf::SHN_ABS => true,
            elf::STT_TLS => info.tls.is_some_and(|t| value <= t.memsz),
            _ => loads
                .iter()
                .any(|l| l.holds_mem(value, sym.st_size(endian))),
        };
        if !fits {
            return Err(bad(format_args!(
                "dynamic symbol {name} ({value:#x}) lies outside the object"
            )));
        }
        info.defined.push(DynSym { name, value, kind });
    }
    Ok(())
}

/// A readable name for common `e_machine` values.
pub(crate) fn machine_name(m: u16) -> &'static str {
    match m {
        3 => "i386",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC64",
        22 => "s390",
        40 => "ARM",
        62 => "x86-64",
        183 => "AArch64",
        243 => "RISC-V",
        258 => "LoongArch",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_exe() -> Vec<u8> {
        std::fs::read("/proc/self/exe").expect("read own executable")
    }

    fn parse_bytes(b: &[u8], s: &str) -> Result<ElfInfo, ElfError> {
        parse(b, b.len() as u64, s)
    }

    #[test]
    fn rejects_non_elf() {
        assert!(matches!(
            parse_bytes(b"hello, world", ".x"),
            Err(ElfError::NotElf(_))
        ));
        assert!(matches!(
            parse_bytes(b"\x7fELF", ".x"),
            Err(ElfError::Truncated(_))
        ));
    }

    #[test]
    fn rejects_other_machine_and_class() {
        let mut exe = own_exe();
        exe[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert!(
            matches!(parse_bytes(&exe, ".x"), Err(ElfError::WrongArch(m)) if m.contains("AArch64"))
        );
        let mut exe = own_exe();
        exe[4] = 1;
        assert!(matches!(
            parse_bytes(&exe, ".x"),
            Err(ElfError::WrongArch(_))
        ));
    }

    #[test]
    fn reads_own_executable() {
        // The test binary is a PIE (ET_DYN) that needs libc.
        let exe = own_exe();
        let info = parse_bytes(&exe, ".text").expect("own executable parses");
        assert!(
            info.needed.iter().any(|n| n.starts_with("libc.so")),
            "{info:?}"
        );
        assert!(info.section.is_some());
        assert!(!info.exec.is_empty());
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let exe = own_exe();
        for len in [64, 100, 1000, 4096, exe.len() / 2, exe.len() - 1] {
            assert!(parse_bytes(&exe[..len], ".text").is_err(), "cut at {len}");
        }
    }
}
