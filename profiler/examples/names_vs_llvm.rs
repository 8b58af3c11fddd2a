//! How often the symbolizer's function names agree with llvm-symbolizer's
//! (the resolver `go tool pprof` runs) on addresses in a file.
//!
//! `cargo run --release -p hotpatch-profiler --example names_vs_llvm -- FILE [ADDRFILE]`
//!
//! Addresses: one hex file virtual address a line from ADDRFILE, or else the
//! middle of every sized function symbol of FILE's `.dynsym`. Prints the
//! agreement in both naming modes (addr2line-compatible and source names)
//! and the first disagreements.

#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "example")]

use std::io::Write;
use std::process::{Command, Stdio};

use hotpatch_symbolizer::resolve::Naming;
use hotpatch_symbolizer::{DebugSearch, ElfSymbolizer, FileVirtAddr};
use object::{Object, ObjectSymbol};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let addrs: Vec<u64> = match args.get(2) {
        Some(f) => std::fs::read_to_string(f)
            .unwrap()
            .lines()
            .filter_map(|l| u64::from_str_radix(l.trim().trim_start_matches("0x"), 16).ok())
            .collect(),
        None => {
            let data = std::fs::read(&path).unwrap();
            let elf = object::File::parse(&*data).unwrap();
            let mut v: Vec<u64> = elf
                .dynamic_symbols()
                .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 1)
                .map(|s| s.address() + s.size() / 2)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        }
    };
    let mut child = Command::new("llvm-symbolizer")
        .arg(format!("--obj={}", path.display()))
        .args(["--no-inlines", "--functions=linkage"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = addrs.iter().map(|a| format!("{a:#x}\n")).collect();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let llvm: Vec<String> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| b.lines().next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        llvm.len(),
        addrs.len(),
        "one llvm-symbolizer block per address"
    );
    for naming in [Naming::Addr2line, Naming::Source] {
        let sym = ElfSymbolizer::open(&path, &DebugSearch::default())
            .unwrap()
            .with_naming(naming);
        let mut same = 0;
        let mut diff = Vec::new();
        for (a, l) in addrs.iter().zip(&llvm) {
            let (frames, _) = sym.resolve(FileVirtAddr(*a), false);
            let ours = frames
                .first()
                .and_then(|f| f.function.clone())
                .unwrap_or_else(|| String::from("??"));
            if &ours == l {
                same += 1;
            } else {
                diff.push((*a, ours, l.clone()));
            }
        }
        println!(
            "{naming:?}: {same} of {} addresses named as llvm-symbolizer names them ({:.1}%)",
            addrs.len(),
            100.0 * same as f64 / addrs.len() as f64
        );
        for (a, o, l) in diff.iter().take(8) {
            let (all, src) = sym.resolve(FileVirtAddr(*a), true);
            let all: Vec<String> = all.iter().map(|f| format!("{:?}", f.function)).collect();
            println!(
                "  {a:#x}: ours {o}, llvm {l} (all frames {src:?}: {})",
                all.join(" < ")
            );
        }
    }
}
