//! A small, bounds-checked ELF64 reader: just what the loader checks before
//! `dlopen` (header, program headers, dynamic section, dynamic symbols,
//! one section by name). Every offset read from the file is checked against
//! the file's length; a malformed file is an error, never a panic.

use std::fmt;

/// `EM_X86_64`.
pub(crate) const EM_X86_64: u16 = 62;
const ET_DYN: u16 = 3;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_TLS: u32 = 7;
const SHT_DYNSYM: u32 = 11;
const DT_NULL: i64 = 0;
const DT_NEEDED: i64 = 1;
const DT_STRTAB: i64 = 5;
const DT_STRSZ: i64 = 10;
const DT_SONAME: i64 = 14;
const DT_RPATH: i64 = 15;
const DT_RUNPATH: i64 = 29;
const DT_FLAGS: i64 = 30;
const DT_FLAGS_1: i64 = 0x6fff_fffb;
/// `DF_STATIC_TLS`: the object uses the static TLS model (initial-exec).
pub(crate) const DF_STATIC_TLS: u64 = 0x10;
/// `DF_1_NODELETE`: `dlclose` never unmaps the object.
pub(crate) const DF_1_NODELETE: u64 = 0x8;

/// Why the bytes are not an ELF file this loader can take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ElfError {
    /// No ELF magic, or a structure that points outside the file.
    NotElf(String),
    /// An ELF file for another class, byte order or machine.
    WrongArch(String),
}

/// The `PT_TLS` segment of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsSegment {
    /// Size of the TLS block (initialized data + zero-filled tail).
    pub mem_size: u64,
    /// Size of the initialization image.
    pub file_size: u64,
    /// Alignment of the TLS block.
    pub align: u64,
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
    pub defined: Vec<String>,
    /// Dynamic symbols the object imports.
    pub imported: Vec<String>,
    /// File range of the section named by the caller, if present.
    pub section: Option<(usize, usize)>,
    /// `[lowest p_vaddr, highest p_vaddr + p_memsz)` over the `PT_LOAD`s.
    pub load_range: Option<(u64, u64)>,
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
    pub(crate) fn defines(&self, name: &str) -> bool {
        self.defined.iter().any(|s| s == name)
    }

    pub(crate) fn imports(&self, name: &str) -> bool {
        self.imported.iter().any(|s| s == name)
    }
}

fn bad(what: &str) -> ElfError {
    ElfError::NotElf(format!("malformed ELF: {what}"))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&self, off: u64, len: u64) -> Result<&[u8], ElfError> {
        let start = usize::try_from(off).map_err(|_| bad("offset"))?;
        let len = usize::try_from(len).map_err(|_| bad("length"))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| bad("range overflows"))?;
        self.0
            .get(start..end)
            .ok_or_else(|| bad("structure extends past end of file"))
    }
    fn u16(&self, off: u64) -> Result<u16, ElfError> {
        let b = self.bytes(off, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&self, off: u64) -> Result<u32, ElfError> {
        let b = self.bytes(off, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, off: u64) -> Result<u64, ElfError> {
        let b = self.bytes(off, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// NUL-terminated string at `off` inside the table `[base, base+size)`.
    fn cstr(&self, base: u64, size: u64, off: u64) -> Result<String, ElfError> {
        if off >= size {
            return Err(bad("string offset outside its table"));
        }
        let table = self.bytes(base, size)?;
        let s = &table[off as usize..];
        let end = s
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| bad("unterminated string"))?;
        Ok(String::from_utf8_lossy(&s[..end]).into_owned())
    }
}

struct Phdr {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

/// Parses `data` as an x86-64 ELF64 shared object, and finds the section
/// named `section` if there is one.
pub(crate) fn parse(data: &[u8], section: &str) -> Result<ElfInfo, ElfError> {
    if data.len() < 4 || data[..4] != *b"\x7fELF" {
        return Err(ElfError::NotElf(
            "no ELF magic (\\x7fELF) at the start of the file".into(),
        ));
    }
    if data.len() < 64 {
        return Err(bad("file shorter than an ELF64 header"));
    }
    match data[4] {
        2 => {}
        1 => return Err(ElfError::WrongArch("ELFCLASS32 (a 32-bit object)".into())),
        c => return Err(ElfError::NotElf(format!("unknown ELF class {c}"))),
    }
    if data[5] != 1 {
        return Err(ElfError::WrongArch("big-endian object".into()));
    }
    let r = Reader(data);
    let e_type = r.u16(16)?;
    let e_machine = r.u16(18)?;
    if e_machine != EM_X86_64 {
        return Err(ElfError::WrongArch(format!(
            "e_machine {e_machine} ({}), expected {EM_X86_64} (x86-64)",
            machine_name(e_machine)
        )));
    }
    if e_type != ET_DYN {
        let kind = match e_type {
            1 => "a relocatable object (ET_REL)",
            2 => "an executable (ET_EXEC)",
            4 => "a core dump (ET_CORE)",
            _ => "an unknown ELF type",
        };
        return Err(ElfError::NotElf(format!(
            "{kind}, not a shared object (ET_DYN)"
        )));
    }

    let mut info = ElfInfo::default();
    let phdrs = program_headers(&r)?;
    for p in phdrs.iter().filter(|p| p.p_type == PT_LOAD) {
        let end = p.vaddr.saturating_add(p.memsz);
        info.load_range = Some(match info.load_range {
            None => (p.vaddr, end),
            Some((lo, hi)) => (lo.min(p.vaddr), hi.max(end)),
        });
    }
    for p in &phdrs {
        if p.p_type == PT_TLS {
            info.tls = Some(TlsSegment {
                mem_size: p.memsz,
                file_size: p.filesz,
                align: p.align,
            });
        }
    }
    if let Some(dynamic) = phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) {
        read_dynamic(&r, &phdrs, dynamic, &mut info)?;
    }
    read_sections(&r, section, &mut info)?;
    Ok(info)
}

fn program_headers(r: &Reader<'_>) -> Result<Vec<Phdr>, ElfError> {
    let phoff = r.u64(32)?;
    let phentsize = u64::from(r.u16(54)?);
    let phnum = u64::from(r.u16(56)?);
    if phnum > 0 && phentsize < 56 {
        return Err(bad("program header entry too small"));
    }
    (0..phnum)
        .map(|i| {
            let o = phoff
                .checked_add(i * phentsize)
                .ok_or_else(|| bad("program header offset"))?;
            Ok(Phdr {
                p_type: r.u32(o)?,
                offset: r.u64(o + 8)?,
                vaddr: r.u64(o + 16)?,
                filesz: r.u64(o + 32)?,
                memsz: r.u64(o + 40)?,
                align: r.u64(o + 48)?,
            })
        })
        .collect()
}

/// File offset of virtual address `vaddr`, through the `PT_LOAD` segments.
fn vaddr_to_offset(phdrs: &[Phdr], vaddr: u64) -> Option<u64> {
    phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .find(|p| vaddr >= p.vaddr && vaddr - p.vaddr < p.filesz)
        .map(|p| p.offset + (vaddr - p.vaddr))
}

fn read_dynamic(
    r: &Reader<'_>,
    phdrs: &[Phdr],
    dynamic: &Phdr,
    info: &mut ElfInfo,
) -> Result<(), ElfError> {
    let mut entries = Vec::new();
    let count = dynamic.filesz / 16;
    for i in 0..count {
        let o = dynamic.offset + i * 16;
        let tag = r.u64(o)? as i64;
        let val = r.u64(o + 8)?;
        if tag == DT_NULL {
            break;
        }
        entries.push((tag, val));
    }
    let find = |t: i64| entries.iter().find(|(tag, _)| *tag == t).map(|&(_, v)| v);
    info.flags = find(DT_FLAGS).unwrap_or(0);
    info.flags_1 = find(DT_FLAGS_1).unwrap_or(0);
    let (Some(strtab), Some(strsz)) = (find(DT_STRTAB), find(DT_STRSZ)) else {
        return Ok(());
    };
    // DT_STRTAB is a virtual address (unrelocated in the file).
    let base = vaddr_to_offset(phdrs, strtab).ok_or_else(|| bad("DT_STRTAB outside PT_LOAD"))?;
    for &(tag, val) in &entries {
        match tag {
            DT_NEEDED => info.needed.push(r.cstr(base, strsz, val)?),
            DT_SONAME => info.soname = Some(r.cstr(base, strsz, val)?),
            DT_RPATH => info.rpath = Some(r.cstr(base, strsz, val)?),
            DT_RUNPATH => info.runpath = Some(r.cstr(base, strsz, val)?),
            _ => {}
        }
    }
    Ok(())
}

fn read_sections(r: &Reader<'_>, wanted: &str, info: &mut ElfInfo) -> Result<(), ElfError> {
    let shoff = r.u64(40)?;
    let shentsize = u64::from(r.u16(58)?);
    let mut shnum = u64::from(r.u16(60)?);
    let mut shstrndx = u64::from(r.u16(62)?);
    if shoff == 0 {
        return Ok(()); // section headers stripped: no descriptor, no dynsym
    }
    if shentsize < 64 {
        return Err(bad("section header entry too small"));
    }
    // Extended numbering: the real counts live in section 0.
    if shnum == 0 {
        shnum = r.u64(shoff + 32)?;
    }
    if shstrndx == 0xffff {
        shstrndx = u64::from(r.u32(shoff + 40)?);
    }
    if shnum > 65_536 {
        return Err(bad("implausible section count"));
    }
    let sh = |i: u64| {
        shoff
            .checked_add(i * shentsize)
            .ok_or_else(|| bad("section header offset"))
    };
    let shstr = sh(shstrndx)?;
    let (str_off, str_size) = (r.u64(shstr + 24)?, r.u64(shstr + 32)?);
    for i in 0..shnum {
        let o = sh(i)?;
        let name_off = u64::from(r.u32(o)?);
        let sh_type = r.u32(o + 4)?;
        let offset = r.u64(o + 24)?;
        let size = r.u64(o + 32)?;
        if info.section.is_none() && sh_type != 8
        /* SHT_NOBITS */
        {
            if let Ok(name) = r.cstr(str_off, str_size, name_off) {
                if name == wanted {
                    let bytes = r.bytes(offset, size)?;
                    let start = bytes.as_ptr() as usize - r.0.as_ptr() as usize;
                    info.section = Some((start, bytes.len()));
                }
            }
        }
        if sh_type == SHT_DYNSYM {
            let link = u64::from(r.u32(o + 40)?);
            let entsize = r.u64(o + 56)?.max(24);
            let strs = sh(link)?;
            let (s_off, s_size) = (r.u64(strs + 24)?, r.u64(strs + 32)?);
            for k in 1..size / entsize {
                let e = offset + k * entsize;
                let st_name = u64::from(r.u32(e)?);
                let shndx = r.u16(e + 6)?;
                let name = r.cstr(s_off, s_size, st_name)?;
                if shndx == 0 {
                    info.imported.push(name);
                } else {
                    info.defined.push(name);
                }
            }
        }
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

    #[test]
    fn rejects_non_elf() {
        assert!(matches!(
            parse(b"hello, world", ".x"),
            Err(ElfError::NotElf(_))
        ));
        assert!(matches!(parse(b"\x7fELF", ".x"), Err(ElfError::NotElf(_))));
    }

    #[test]
    fn rejects_other_machine_and_class() {
        let mut exe = own_exe();
        exe[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert!(matches!(parse(&exe, ".x"), Err(ElfError::WrongArch(m)) if m.contains("AArch64")));
        let mut exe = own_exe();
        exe[4] = 1;
        assert!(matches!(parse(&exe, ".x"), Err(ElfError::WrongArch(_))));
    }

    #[test]
    fn reads_own_executable() {
        // The test binary is a PIE (ET_DYN) that needs libc.
        let exe = own_exe();
        let info = parse(&exe, ".text").expect("own executable parses");
        assert!(
            info.needed.iter().any(|n| n.starts_with("libc.so")),
            "{info:?}"
        );
        assert!(info.section.is_some());
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let exe = own_exe();
        for len in [64, 100, 1000, 4096, exe.len() / 2] {
            let _ = parse(&exe[..len], ".text");
        }
    }
}
