//! Names as people read them (issue #12 item 5): in profiles, C functions
//! get the names llvm-symbolizer (which `go tool pprof` runs) gives them --
//! `cfsetospeed`, `fclose`, `connect` -- not glibc's internal aliases
//! (`__GI_cfsetospeed`, `_IO_new_fclose`, `__libc_connect`), which the
//! addr2line-compatible naming keeps (`hotpatch symbolize`'s default).
//!
//! Compared with llvm-symbolizer itself on the middle of every exported
//! function of the C library (with libc6-dbg's DWARF when installed).

#![allow(clippy::unwrap_used, reason = "tests")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hotpatch_symbolizer::resolve::Naming;
use hotpatch_symbolizer::{DebugSearch, ElfSymbolizer, FileVirtAddr};
use object::{Object, ObjectSymbol};

fn libc_path() -> PathBuf {
    // The C library this test process runs with.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps
        .lines()
        .find(|l| l.contains("/libc.so") || l.contains("/libc-"))
        .expect("libc is mapped");
    PathBuf::from(line.split_whitespace().last().unwrap())
}

/// (address, exported name) for every sized function in `.dynsym`.
fn exported(path: &Path) -> Vec<(u64, String)> {
    let data = std::fs::read(path).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let mut v: Vec<(u64, String)> = elf
        .dynamic_symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 1)
        .map(|s| (s.address() + s.size() / 2, s.name().unwrap().to_owned()))
        .collect();
    v.sort();
    v.dedup_by_key(|e| e.0);
    v
}

fn name(sym: &ElfSymbolizer, addr: u64) -> String {
    sym.resolve(FileVirtAddr(addr), false)
        .0
        .first()
        .and_then(|f| f.function.clone())
        .unwrap_or_else(|| String::from("??"))
}

fn addr_of(path: &Path, want: &str) -> u64 {
    let data = std::fs::read(path).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    elf.dynamic_symbols()
        .find(|s| s.name() == Ok(want) && s.size() > 1)
        .map(|s| s.address() + s.size() / 2)
        .unwrap_or_else(|| panic!("{want} is exported by {}", path.display()))
}

#[test]
fn c_functions_get_their_public_names_in_source_naming() {
    let libc = libc_path();
    let source = ElfSymbolizer::open(&libc, &DebugSearch::default())
        .unwrap()
        .with_naming(Naming::Source);
    for f in ["cfsetospeed", "fclose", "connect", "abort"] {
        let a = addr_of(&libc, f);
        assert_eq!(name(&source, a), f, "at {a:#x}");
    }
    // The addr2line-compatible naming is unchanged: with glibc's symbol
    // table or DWARF at hand it says what binutils says (an alias, for
    // most of these).
    let plain = ElfSymbolizer::open(&libc, &DebugSearch::default()).unwrap();
    assert_eq!(plain.naming(), Naming::Addr2line);
    let a = addr_of(&libc, "fclose");
    if Command::new("addr2line").arg("--version").output().is_ok() {
        let out = Command::new("addr2line")
            .args(["-f", "-C", "-e"])
            .arg(&libc)
            .arg(format!("{a:#x}"))
            .output()
            .unwrap();
        let theirs = String::from_utf8_lossy(&out.stdout);
        assert_eq!(theirs.lines().next().unwrap(), name(&plain, a));
    }
}

#[test]
fn source_naming_agrees_with_llvm_symbolizer_on_the_c_library() {
    let libc = libc_path();
    let Ok(mut child) = Command::new("llvm-symbolizer")
        .arg(format!("--obj={}", libc.display()))
        .args(["--no-inlines", "--functions=linkage"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "llvm-symbolizer is required in CI (apt-get install llvm)"
        );
        eprintln!("SKIP: llvm-symbolizer not installed (apt-get install llvm)");
        return;
    };
    let addrs: Vec<u64> = exported(&libc).into_iter().map(|(a, _)| a).collect();
    let input: String = addrs.iter().map(|a| format!("{a:#x}\n")).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let llvm: Vec<&str> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| b.lines().next().unwrap_or(""))
        .collect();
    assert_eq!(llvm.len(), addrs.len());
    let mut agree = [0usize; 2];
    let mut first_diffs = Vec::new();
    for (k, naming) in [Naming::Addr2line, Naming::Source].into_iter().enumerate() {
        let sym = ElfSymbolizer::open(&libc, &DebugSearch::default())
            .unwrap()
            .with_naming(naming);
        for (a, l) in addrs.iter().zip(&llvm) {
            let ours = name(&sym, *a);
            if ours == *l {
                agree[k] += 1;
            } else if naming == Naming::Source && first_diffs.len() < 10 {
                first_diffs.push(format!("{a:#x}: ours {ours}, llvm {l}"));
            }
        }
    }
    let pct = |n: usize| 100.0 * n as f64 / addrs.len() as f64;
    println!(
        "{}: {} addresses; same name as llvm-symbolizer: addr2line naming {:.1}%, source naming {:.1}%",
        libc.display(),
        addrs.len(),
        pct(agree[0]),
        pct(agree[1])
    );
    assert!(
        pct(agree[1]) >= 99.0,
        "source naming agrees with llvm-symbolizer on {:.1}%:\n{}",
        pct(agree[1]),
        first_diffs.join("\n")
    );
}
