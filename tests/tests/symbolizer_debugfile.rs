//! Separate debug files: found by build-id under a configurable root, found
//! by `.gnu_debuglink` (CRC checked), and rejected when they do not match.

use std::path::{Path, PathBuf};
use std::process::Command;

use hotpatch_symbolizer::{DebugInfo, DebugSearch, ElfSymbolizer, FileVirtAddr, Source};
use object::{Object as _, ObjectSymbol as _};

fn run(cmd: &str, args: &[&Path]) {
    let st = Command::new(cmd).args(args).status().expect(cmd);
    assert!(st.success(), "{cmd} {args:?}");
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hp-sym-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

fn symbol_addr(so: &Path, name: &str) -> u64 {
    let data = std::fs::read(so).expect("read");
    let f = object::File::parse(&*data).expect("parse");
    f.symbols()
        .find(|s| s.name() == Ok(name))
        .map(|s| s.address())
        .expect(name)
}

fn build_id_hex(so: &Path) -> String {
    let data = std::fs::read(so).expect("read");
    let f = object::File::parse(&*data).expect("parse");
    f.build_id()
        .expect("note")
        .expect("build-id")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// (stripped .so, its .debug file) in `dir`.
fn split(fixture: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let so = hotpatch_tests::fixtures::plugin(fixture);
    let stripped = dir.join(so.file_name().expect("name"));
    let debug = dir.join("split.debug");
    std::fs::copy(&so, &stripped).expect("copy");
    run(
        "objcopy",
        &[Path::new("--only-keep-debug"), &stripped, &debug],
    );
    run("strip", &[Path::new("--strip-debug"), &stripped]);
    (stripped, debug)
}

fn assert_resolves_entry(s: &ElfSymbolizer, addr: u64) {
    let (frames, source) = s.resolve(FileVirtAddr(addr), true);
    assert_eq!(source, Source::Dwarf, "{frames:?}");
    assert_eq!(frames[0].function.as_deref(), Some("sym_b_entry"));
    assert!(
        frames[0]
            .file
            .as_deref()
            .is_some_and(|f| f.ends_with("sym-b/src/lib.rs"))
    );
    assert!(frames[0].line.is_some());
}

#[test]
fn stripped_module_finds_debug_info_by_build_id() {
    let dir = tempdir("buildid");
    let (stripped, debug) = split("sym-b", &dir);
    let addr = symbol_addr(&stripped, "sym_b_entry");
    let root = dir.join("root");
    let none =
        ElfSymbolizer::open(&stripped, &DebugSearch::with_roots([root.clone()])).expect("open");
    assert_eq!(none.debug_info(), &DebugInfo::None);
    assert_eq!(
        none.resolve(FileVirtAddr(addr), true).1,
        Source::Symtab,
        "symbols survive strip --strip-debug"
    );

    let hex = build_id_hex(&stripped);
    let slot = root
        .join(".build-id")
        .join(&hex[..2])
        .join(format!("{}.debug", &hex[2..]));
    std::fs::create_dir_all(slot.parent().expect("parent")).expect("mkdir");
    std::fs::copy(&debug, &slot).expect("copy");
    let s = ElfSymbolizer::open(&stripped, &DebugSearch::with_roots([root.clone()])).expect("open");
    assert_eq!(s.debug_info(), &DebugInfo::BuildId(slot.clone()));
    assert_resolves_entry(&s, addr);

    // A debug file of another module in that slot is rejected, not used.
    let other = tempdir("buildid-other");
    let (_, wrong) = split("sym-a", &other);
    std::fs::copy(&wrong, &slot).expect("copy");
    let s = ElfSymbolizer::open(&stripped, &DebugSearch::with_roots([root])).expect("open");
    assert_eq!(s.debug_info(), &DebugInfo::None);
    assert!(
        s.rejected()
            .iter()
            .any(|e| e.code() == "E_SYM_BUILD_ID_MISMATCH"),
        "{:?}",
        s.rejected()
    );
    assert_eq!(s.resolve(FileVirtAddr(addr), true).1, Source::Symtab);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&other).ok();
}

#[test]
fn stripped_module_finds_debug_info_by_debuglink_and_checks_the_crc() {
    let dir = tempdir("debuglink");
    let (stripped, debug) = split("sym-b", &dir);
    let link = format!("--add-gnu-debuglink={}", debug.display());
    run("objcopy", &[Path::new(&link), &stripped]);
    let addr = symbol_addr(&stripped, "sym_b_entry");
    // No build-id roots: only the debuglink can find it.
    let s = ElfSymbolizer::open(&stripped, &DebugSearch::with_roots([])).expect("open");
    assert_eq!(s.debug_info(), &DebugInfo::DebugLink(debug.clone()));
    assert_resolves_entry(&s, addr);

    // Change the debug file: the CRC no longer matches and it is rejected.
    let mut bytes = std::fs::read(&debug).expect("read");
    bytes.extend_from_slice(b"tampered");
    std::fs::write(&debug, bytes).expect("write");
    let s = ElfSymbolizer::open(&stripped, &DebugSearch::with_roots([])).expect("open");
    assert_eq!(s.debug_info(), &DebugInfo::None);
    let e = s
        .rejected()
        .iter()
        .find(|e| e.code() == "E_SYM_BUILD_ID_MISMATCH")
        .expect("rejected");
    assert!(e.to_string().contains("CRC32"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
