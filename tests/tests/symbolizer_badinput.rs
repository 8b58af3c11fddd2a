//! Bad input never panics: truncations and byte flips of a real ELF with
//! DWARF (deterministic property loop), plus typed errors for the classic
//! cases.

use std::path::Path;

use hotpatch_symbolizer::{DebugSearch, ElfSymbolizer, FileVirtAddr};
use object::{Object as _, ObjectSection as _};

fn exercise(name: &Path, bytes: Vec<u8>, probes: &[u64]) {
    if let Ok(s) = ElfSymbolizer::from_bytes(name, bytes, &DebugSearch::with_roots([])) {
        for &p in probes {
            let _ = s.resolve(FileVirtAddr(p), true);
        }
        let _ = s.find_symbol("sym_b_entry");
    }
}

#[test]
fn typed_errors_for_classic_bad_files() {
    let dir = std::env::temp_dir().join(format!("hp-sym-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let search = DebugSearch::with_roots([]);
    let code = |p: &Path| {
        ElfSymbolizer::open(p, &search)
            .expect_err("must fail")
            .code()
    };
    assert_eq!(code(&dir.join("missing.so")), "E_SYM_IO");
    std::fs::write(dir.join("empty.so"), b"").expect("write");
    assert_eq!(code(&dir.join("empty.so")), "E_SYM_NOT_ELF");
    std::fs::write(dir.join("text.so"), b"#!/bin/sh\necho hi\n").expect("write");
    assert_eq!(code(&dir.join("text.so")), "E_SYM_NOT_ELF");
    let so = hotpatch_tests::fixtures::plugin("sym-b");
    let bytes = std::fs::read(&so).expect("read");
    std::fs::write(dir.join("trunc.so"), &bytes[..100]).expect("write");
    assert_eq!(code(&dir.join("trunc.so")), "E_SYM_TRUNCATED");
    let mut elf32 = bytes[..64].to_vec();
    elf32[4] = 1;
    std::fs::write(dir.join("elf32.so"), elf32).expect("write");
    assert_eq!(code(&dir.join("elf32.so")), "E_SYM_NOT_ELF");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn corrupted_and_truncated_elf_and_dwarf_never_panic() {
    let so = hotpatch_tests::fixtures::plugin("sym-b");
    let bytes = std::fs::read(&so).expect("read");
    let file = object::File::parse(&*bytes).expect("parse");
    // Regions worth corrupting: headers, and every DWARF and symbol section.
    let mut regions: Vec<(usize, usize)> = vec![(0, 4096)];
    for s in file.sections() {
        let name = s.name().unwrap_or("");
        if name.starts_with(".debug")
            || name.contains("sym")
            || name == ".gnu_debuglink"
            || name == ".note.gnu.build-id"
        {
            if let Some((off, len)) = s.file_range() {
                regions.push((off as usize, len as usize));
            }
        }
    }
    let text = file.section_by_name(".text").expect(".text");
    let probes: Vec<u64> = (0..16)
        .map(|i| text.address() + i * text.size() / 16)
        .collect();
    let name = Path::new("corrupt.so");

    // Truncations, from tiny to almost whole.
    for cut in [
        0,
        1,
        4,
        5,
        16,
        63,
        64,
        65,
        200,
        4096,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        exercise(name, bytes[..cut].to_vec(), &probes);
    }
    for &(off, len) in &regions {
        exercise(name, bytes[..off + len / 2].to_vec(), &probes);
    }
    // Deterministic byte flips: 8 per case, inside one region at a time.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let (off, len) = regions[round % regions.len()];
        if len == 0 {
            continue;
        }
        let mut b = bytes.clone();
        for _ in 0..8 {
            let i = off + (next() as usize) % len;
            b[i] ^= 1 << (next() % 8);
            if round % 5 == 0 {
                b[i] = 0xff; // also large values: lengths, offsets, counts
            }
        }
        exercise(name, b, &probes);
    }
}
