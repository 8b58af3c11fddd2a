//! The patch as a module with its own DWARF: once a generation's code is
//! placed, its objects' `.debug_*` sections are relocated against the code's
//! runtime addresses and written, with a symbol table, into a small ELF file
//! (`ET_EXEC`, one `PT_LOAD` without file bytes covering the generation's
//! code at its runtime address, load bias 0). The symbolizer's registry
//! takes that file as the generation's module
//! ([`ElfModuleSpec::file`](hotpatch_symbolizer::registry::ElfModuleSpec::file)),
//! so profiles (resolved in the CLI, which opens the file by its path) and
//! `hotpatch symbolize --exe FILE ADDR` name patched frames with their new
//! `file:line`.
//!
//! Objects are concatenated per section name, as a linker does: a
//! relocation against another debug section of the same object resolves to
//! where that object's part of the section starts in the output.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::bundle::{Bundle, DTarget, unhex};
use crate::error::{E_WATCH_RELOCATION, Error, Result, io};

const R_64: u32 = 1;
const R_DTPOFF64: u32 = 17;
const R_32: u32 = 10;
const R_DTPOFF32: u32 = 21;

/// A function symbol of the module: mangled name, runtime address, size.
pub type ModuleSym = (String, u64, u64);

/// The relocated debug sections of `b`, concatenated per name (in first
/// appearance order). `addr_of[i]` is the runtime address of
/// `b.sections[i]`; `tls` gives a thread-local's offset in the executable's
/// TLS block.
///
/// # Errors
/// `E_WATCH_BAD_BUNDLE` (bad hex), `E_WATCH_RELOCATION` (an unsupported
/// type, a value that does not fit, an offset past the section's end).
pub fn relocate(
    b: &Bundle,
    addr_of: &[usize],
    tls: &dyn Fn(&str) -> Option<u64>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    // Pass 1: where each object's part of each section starts.
    let mut starts: Vec<HashMap<&str, usize>> = Vec::new();
    let mut bytes: Vec<Vec<Vec<u8>>> = Vec::new();
    for o in &b.debug {
        let mut mine = HashMap::new();
        let mut data = Vec::new();
        for s in &o.sections {
            let d = unhex(&s.hex)?;
            let i = match at.get(&s.name) {
                Some(&i) => i,
                None => {
                    out.push((s.name.clone(), Vec::new()));
                    at.insert(s.name.clone(), out.len() - 1);
                    out.len() - 1
                }
            };
            mine.insert(s.name.as_str(), out[i].1.len());
            // Reserve the room; the bytes are written in pass 2.
            let grown = out[i].1.len() + d.len();
            out[i].1.resize(grown, 0);
            data.push(d);
        }
        starts.push(mine);
        bytes.push(data);
    }
    // Pass 2: relocate each part in place and copy it.
    for (k, o) in b.debug.iter().enumerate() {
        for (j, s) in o.sections.iter().enumerate() {
            let mut d = std::mem::take(&mut bytes[k][j]);
            for r in &s.relocs {
                let bad = |why: &str| {
                    Error::new(
                        E_WATCH_RELOCATION,
                        format!(
                            "debug relocation type {} at {}+{:#x} of {}: {why}",
                            r.r_type, s.name, r.offset, o.object
                        ),
                    )
                };
                let base: i128 = match &r.target {
                    DTarget::Section { index, offset } => {
                        let a = addr_of
                            .get(*index)
                            .ok_or_else(|| bad("a section that does not exist"))?;
                        *a as i128 + i128::from(*offset)
                    }
                    DTarget::Debug { name } => {
                        starts[k].get(name.as_str()).copied().unwrap_or(0) as i128
                    }
                    DTarget::Tls { name } => tls(name).unwrap_or(0) as i128,
                    DTarget::Absent => 0,
                };
                let v = base + i128::from(r.addend);
                let off = usize::try_from(r.offset).map_err(|_| bad("offset"))?;
                match r.r_type {
                    R_64 | R_DTPOFF64 => {
                        let v = u64::try_from(v)
                            .or_else(|_| i64::try_from(v).map(|v| v as u64))
                            .map_err(|_| bad("does not fit"))?;
                        d.get_mut(off..off + 8)
                            .ok_or_else(|| bad("past the section's end"))?
                            .copy_from_slice(&v.to_le_bytes());
                    }
                    R_32 | R_DTPOFF32 => {
                        let v = u32::try_from(v)
                            .or_else(|_| i32::try_from(v).map(|v| v as u32))
                            .map_err(|_| bad("does not fit"))?;
                        d.get_mut(off..off + 4)
                            .ok_or_else(|| bad("past the section's end"))?
                            .copy_from_slice(&v.to_le_bytes());
                    }
                    _ => return Err(bad("not supported in debug sections")),
                }
            }
            let i = at[&s.name];
            let st = starts[k][s.name.as_str()];
            out[i].1[st..st + d.len()].copy_from_slice(&d);
        }
    }
    Ok(out)
}

/// 20 bytes that differ between images (their content, the process, the
/// time): not a cryptographic digest, an identity.
fn build_id(
    code: (u64, u64),
    loads: &[(u64, u64)],
    debug: &[(String, Vec<u8>)],
    syms: &[ModuleSym],
) -> [u8; 20] {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut out = [0u8; 20];
    for (k, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = DefaultHasher::new();
        (k, code, loads, debug, syms, std::process::id(), now).hash(&mut h);
        let v = h.finish().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    out
}

fn push_u16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn push_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn push_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

struct Shdr {
    name: u32,
    kind: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
    info: u32,
    align: u64,
    entsize: u64,
}

/// An ELF64 x86-64 `ET_EXEC` image: one `PT_LOAD` (read, execute, no file
/// bytes) per range of `loads` (`start`, `len`: one per function, so each
/// is a range of its own for the profiler's unwind info), a `.text`
/// `SHT_NOBITS` section over `code` (`start`, `len`), the `debug` sections,
/// and `.symtab` with `syms` (global functions in `.text`).
pub fn elf_image(
    code: (u64, u64),
    loads: &[(u64, u64)],
    debug: &[(String, Vec<u8>)],
    syms: &[ModuleSym],
) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut shstr = vec![0u8];
    let mut name = |n: &str| {
        let at = shstr.len() as u32;
        shstr.extend_from_slice(n.as_bytes());
        shstr.push(0);
        at
    };
    let mut body: Vec<u8> = Vec::new();
    let head = EHDR + PHDR * loads.len();
    let file_at = |body: &Vec<u8>| (head + body.len()) as u64;
    let mut shdrs = vec![Shdr {
        name: 0,
        kind: 0,
        flags: 0,
        addr: 0,
        offset: 0,
        size: 0,
        link: 0,
        info: 0,
        align: 0,
        entsize: 0,
    }];
    shdrs.push(Shdr {
        name: name(".text"),
        kind: object::elf::SHT_NOBITS,
        flags: u64::from(object::elf::SHF_ALLOC | object::elf::SHF_EXECINSTR),
        addr: code.0,
        offset: file_at(&body),
        size: code.1,
        link: 0,
        info: 0,
        align: 16,
        entsize: 0,
    });
    // NT_GNU_BUILD_ID: the profile's mapping and the registry's history
    // name the module by it, as any other.
    {
        while (head + body.len()) % 4 != 0 {
            body.push(0);
        }
        let offset = file_at(&body);
        push_u32(&mut body, 4);
        push_u32(&mut body, 20);
        push_u32(&mut body, object::elf::NT_GNU_BUILD_ID);
        body.extend_from_slice(b"GNU\0");
        body.extend_from_slice(&build_id(code, loads, debug, syms));
        shdrs.push(Shdr {
            name: name(".note.gnu.build-id"),
            kind: object::elf::SHT_NOTE,
            flags: 0,
            addr: 0,
            offset,
            size: 36,
            link: 0,
            info: 0,
            align: 4,
            entsize: 0,
        });
    }
    for (n, d) in debug {
        let offset = file_at(&body);
        body.extend_from_slice(d);
        shdrs.push(Shdr {
            name: name(n),
            kind: object::elf::SHT_PROGBITS,
            flags: 0,
            addr: 0,
            offset,
            size: d.len() as u64,
            link: 0,
            info: 0,
            align: 1,
            entsize: 0,
        });
    }
    // .symtab: the null symbol, then the functions (global, in .text = 1).
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; 24];
    for (n, addr, size) in syms {
        let at = strtab.len() as u32;
        strtab.extend_from_slice(n.as_bytes());
        strtab.push(0);
        push_u32(&mut symtab, at);
        symtab.push((object::elf::STB_GLOBAL << 4) | object::elf::STT_FUNC);
        symtab.push(object::elf::STV_DEFAULT);
        push_u16(&mut symtab, 1);
        push_u64(&mut symtab, *addr);
        push_u64(&mut symtab, *size);
    }
    while (head + body.len()) % 8 != 0 {
        body.push(0);
    }
    let symtab_idx = shdrs.len() as u32;
    let sym_off = file_at(&body);
    body.extend_from_slice(&symtab);
    shdrs.push(Shdr {
        name: name(".symtab"),
        kind: object::elf::SHT_SYMTAB,
        flags: 0,
        addr: 0,
        offset: sym_off,
        size: symtab.len() as u64,
        link: symtab_idx + 1,
        info: 1,
        align: 8,
        entsize: 24,
    });
    let str_off = file_at(&body);
    body.extend_from_slice(&strtab);
    shdrs.push(Shdr {
        name: name(".strtab"),
        kind: object::elf::SHT_STRTAB,
        flags: 0,
        addr: 0,
        offset: str_off,
        size: strtab.len() as u64,
        link: 0,
        info: 0,
        align: 1,
        entsize: 0,
    });
    let shstr_name = name(".shstrtab");
    let shstr_off = file_at(&body);
    body.extend_from_slice(&shstr);
    shdrs.push(Shdr {
        name: shstr_name,
        kind: object::elf::SHT_STRTAB,
        flags: 0,
        addr: 0,
        offset: shstr_off,
        size: shstr.len() as u64,
        link: 0,
        info: 0,
        align: 1,
        entsize: 0,
    });
    while (head + body.len()) % 8 != 0 {
        body.push(0);
    }
    let shoff = file_at(&body);
    let mut f = Vec::with_capacity(head + body.len() + shdrs.len() * 64);
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    push_u16(&mut f, object::elf::ET_EXEC);
    push_u16(&mut f, object::elf::EM_X86_64);
    push_u32(&mut f, 1);
    push_u64(&mut f, 0); // e_entry
    push_u64(&mut f, EHDR as u64); // e_phoff
    push_u64(&mut f, shoff);
    push_u32(&mut f, 0); // e_flags
    push_u16(&mut f, EHDR as u16);
    push_u16(&mut f, PHDR as u16);
    push_u16(&mut f, loads.len() as u16);
    push_u16(&mut f, 64);
    push_u16(&mut f, shdrs.len() as u16);
    push_u16(&mut f, (shdrs.len() - 1) as u16);
    // PT_LOAD per range: code, no file bytes.
    for (start, len) in loads {
        push_u32(&mut f, object::elf::PT_LOAD);
        push_u32(&mut f, object::elf::PF_R | object::elf::PF_X);
        push_u64(&mut f, 0); // p_offset
        push_u64(&mut f, *start);
        push_u64(&mut f, *start);
        push_u64(&mut f, 0); // p_filesz
        push_u64(&mut f, *len);
        push_u64(&mut f, 1);
    }
    f.extend_from_slice(&body);
    for s in &shdrs {
        push_u32(&mut f, s.name);
        push_u32(&mut f, s.kind);
        push_u64(&mut f, s.flags);
        push_u64(&mut f, s.addr);
        push_u64(&mut f, s.offset);
        push_u64(&mut f, s.size);
        push_u32(&mut f, s.link);
        push_u32(&mut f, s.info);
        push_u64(&mut f, s.align);
        push_u64(&mut f, s.entsize);
    }
    f
}

/// Writes `bytes` to a new file `dir/name` (replacing a stale one of this
/// process's from before), mode 0644: the process's own file, read by the
/// CLI that resolves profiles.
///
/// # Errors
/// `E_WATCH_IO`.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
    };
    let mut f = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&path).map_err(|e| io(path.display(), e))?;
            open().map_err(|e| io(path.display(), e))?
        }
        Err(e) => return Err(io(path.display(), e)),
    };
    f.write_all(bytes).map_err(|e| io(path.display(), e))?;
    Ok(path)
}

/// The name of generation `gen_id`'s debug ELF written by process `pid`
/// started at `start` (clock ticks since boot, `/proc/<pid>/stat`): the
/// pair names the process even after its pid is reused.
pub fn file_name(pid: i32, start: u64, gen_id: u64) -> String {
    format!("hotpatch-watch-{pid}-{start}-gen{gen_id}.elf")
}

/// The writer of a debug ELF named by [`file_name`]: `(pid, start)`.
fn owner_of(name: &str) -> Option<(i32, u64)> {
    let rest = name.strip_prefix("hotpatch-watch-")?.strip_suffix(".elf")?;
    let mut it = rest.splitn(3, '-');
    let pid = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    it.next()?.strip_prefix("gen")?.parse::<u64>().ok()?;
    Some((pid, start))
}

/// Removes the debug ELFs whose writer has exited, in `dir` and, when
/// `dir` is a build's `target/hotpatch-watch/<build-id>/`, in the other
/// builds' directories beside it (a restarted process runs another build).
/// A live process's files are all kept, those of unloaded generations
/// too: its symbolizer history names them, and a profile resolved later
/// reads them. Once the process is gone no profile of it can be taken or
/// resolved (a written profile carries its names), so they go. Returns how
/// many files were removed; best effort (an unreadable directory or a file
/// that will not go is left).
pub fn sweep_exited(dir: &Path) -> usize {
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(parent) = dir.parent()
        && parent.file_name().is_some_and(|n| n == "hotpatch-watch")
        && let Ok(rd) = std::fs::read_dir(parent)
    {
        dirs.extend(
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && p.as_path() != dir),
        );
    }
    let mut removed = 0;
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some((pid, start)) = name.to_str().and_then(owner_of) else {
                continue;
            };
            if hotpatch_sys::procstart::start_time(pid) == Some(start) {
                continue;
            }
            if std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::bundle::{BDebug, BDebugRel, BDebugSec, hex};
    use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

    fn rel(offset: u64, r_type: u32, target: DTarget, addend: i64) -> BDebugRel {
        BDebugRel {
            offset,
            r_type,
            target,
            addend,
        }
    }

    fn sec(name: &str, len: usize, relocs: Vec<BDebugRel>) -> BDebugSec {
        BDebugSec {
            name: name.into(),
            hex: hex(&vec![0xaa; len]),
            relocs,
        }
    }

    #[test]
    fn sweep_removes_the_debug_files_of_exited_processes_only() {
        let root = std::env::temp_dir().join(format!(
            "hotpatch-watch-sweep-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let here = root.join("target/hotpatch-watch/aaaa");
        let other = root.join("target/hotpatch-watch/bbbb");
        std::fs::create_dir_all(&here).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let me = std::process::id() as i32;
        let my_start = hotpatch_sys::procstart::start_time(me).unwrap();
        // A process that ran and exited (reaped: its pid names no process,
        // or a later one with another start time).
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let dead = c.id() as i32;
        let dead_start = hotpatch_sys::procstart::start_time(dead).unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        let mine = [
            here.join(file_name(me, my_start, 1)),
            here.join(file_name(me, my_start, 2)),
            other.join(file_name(me, my_start, 1)),
        ];
        let gone = [
            here.join(file_name(dead, dead_start, 1)),
            other.join(file_name(dead, dead_start, 3)),
            // Own pid, another start time: an earlier process with the pid.
            here.join(file_name(me, my_start + 1, 1)),
        ];
        let unrelated = here.join("bundle-1.json");
        for f in mine.iter().chain(&gone).chain([&unrelated]) {
            std::fs::write(f, b"x").unwrap();
        }
        assert_eq!(sweep_exited(&here), gone.len());
        for f in &mine {
            assert!(f.exists(), "{} removed", f.display());
        }
        for f in &gone {
            assert!(!f.exists(), "{} kept", f.display());
        }
        assert!(unrelated.exists());
        // Not under a `hotpatch-watch` directory: only `dir` itself.
        let lone = root.join("lone");
        let beside = root.join("beside");
        std::fs::create_dir_all(&lone).unwrap();
        std::fs::create_dir_all(&beside).unwrap();
        let b = beside.join(file_name(dead, dead_start, 1));
        let l = lone.join(file_name(dead, dead_start, 1));
        std::fs::write(&b, b"x").unwrap();
        std::fs::write(&l, b"x").unwrap();
        assert_eq!(sweep_exited(&lone), 1);
        assert!(b.exists() && !l.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn objects_concatenate_and_relocate_like_a_linker() {
        let debug_str = || DTarget::Debug {
            name: ".debug_str".into(),
        };
        let b = Bundle {
            debug: vec![
                BDebug {
                    object: "a.o".into(),
                    sections: vec![
                        sec(".debug_str", 10, vec![]),
                        sec(
                            ".debug_info",
                            20,
                            vec![
                                rel(0, R_32, debug_str(), 3),
                                rel(
                                    4,
                                    R_64,
                                    DTarget::Section {
                                        index: 1,
                                        offset: 4,
                                    },
                                    2,
                                ),
                                rel(12, R_64, DTarget::Absent, 5),
                            ],
                        ),
                    ],
                },
                BDebug {
                    object: "b.o".into(),
                    sections: vec![
                        sec(".debug_info", 8, vec![rel(0, R_32, debug_str(), 1)]),
                        sec(".debug_str", 6, vec![]),
                    ],
                },
            ],
            ..Bundle::default()
        };
        let out = relocate(&b, &[0x1000, 0x7f00_0000_2000], &|_| None).unwrap();
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [".debug_str", ".debug_info"]);
        let info = &out[1].1;
        assert_eq!(info.len(), 28);
        assert_eq!(u32::from_le_bytes(info[0..4].try_into().unwrap()), 3);
        assert_eq!(
            u64::from_le_bytes(info[4..12].try_into().unwrap()),
            0x7f00_0000_2006
        );
        assert_eq!(u64::from_le_bytes(info[12..20].try_into().unwrap()), 5);
        assert_eq!(info[8..12], 0x7f00_u32.to_le_bytes());
        // b.o's part: its .debug_str starts after a.o's 10 bytes.
        assert_eq!(u32::from_le_bytes(info[20..24].try_into().unwrap()), 11);
        assert_eq!(info[24..28], [0xaa; 4]);
        assert_eq!(out[0].1.len(), 16);
        // A value that does not fit and an unknown type are refused.
        let mut bad = b.clone();
        bad.debug[0].sections[1].relocs[0].target = DTarget::Section {
            index: 1,
            offset: 0,
        };
        assert!(relocate(&bad, &[0x1000, 0x7f00_0000_2000], &|_| None).is_err());
        let mut bad = b.clone();
        bad.debug[0].sections[1].relocs[0].r_type = 2;
        assert!(relocate(&bad, &[0x1000, 0x7f00_0000_2000], &|_| None).is_err());
        let mut bad = b;
        bad.debug[0].sections[1].relocs[2].offset = 16;
        assert!(relocate(&bad, &[0x1000, 0x7f00_0000_2000], &|_| None).is_err());
    }

    #[test]
    fn the_image_is_an_elf_file_with_segments_symbols_and_a_build_id() {
        let debug = vec![(".debug_str".to_owned(), b"hello\0".to_vec())];
        let syms = vec![(
            "_ZN1a1f17h0123456789abcdefE".to_owned(),
            0x7f00_0000_1010,
            32,
        )];
        let img = elf_image(
            (0x7f00_0000_1000, 0x1000),
            &[(0x7f00_0000_1000, 16), (0x7f00_0000_1010, 32)],
            &debug,
            &syms,
        );
        let f = object::File::parse(&*img).unwrap();
        assert_eq!(f.build_id().unwrap().map(<[u8]>::len), Some(20));
        let segs: Vec<(u64, u64)> = f.segments().map(|s| (s.address(), s.size())).collect();
        assert_eq!(segs, [(0x7f00_0000_1000, 16), (0x7f00_0000_1010, 32)]);
        let s = f
            .symbols()
            .find(|s| s.name() == Ok(syms[0].0.as_str()))
            .unwrap();
        assert_eq!((s.address(), s.size()), (0x7f00_0000_1010, 32));
        assert_eq!(s.kind(), object::SymbolKind::Text);
        let d = f.section_by_name(".debug_str").unwrap();
        assert_eq!(d.data().unwrap(), b"hello\0");
    }
}
