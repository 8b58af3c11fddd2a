//! Coverage of the patcher over real ELF files: the preflight verdict
//! (exactly what install decides, with the module's branch index) for every
//! function of each file given.
//!
//! ```text
//! cargo run --release -p hotpatch-patcher --example coverage -- [--all-functions] FILE...
//! ```
//! Default: the exported (`.dynsym`, defined, global) functions with a size;
//! `--all-functions`: every function symbol with a size (`.symtab` too), as
//! for a program's own functions. Prints one table row per file, then every
//! refusal with its code and message.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use object::{Object, ObjectSymbol, SymbolKind};

fn main() {
    let mut all_functions = false;
    let mut files = Vec::new();
    for a in std::env::args().skip(1) {
        if a == "--all-functions" {
            all_functions = true;
        } else {
            files.push(a);
        }
    }
    if files.is_empty() {
        eprintln!("usage: coverage [--all-functions] FILE...");
        std::process::exit(2);
    }
    let mut refusals = Vec::new();
    println!(
        "| file | functions | patchable | % | refusals by code | call/syscall relocated | into padding | index build |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let (mut tot, mut tot_ok) = (0usize, 0usize);
    for f in &files {
        let data = std::fs::read(f).expect("read");
        let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data).expect("elf");
        let mut funcs: BTreeMap<u64, (String, u64)> = BTreeMap::new();
        let syms: Vec<_> = if all_functions {
            elf.symbols().chain(elf.dynamic_symbols()).collect()
        } else {
            elf.dynamic_symbols().collect()
        };
        for s in syms {
            if s.kind() != SymbolKind::Text || s.is_undefined() || s.size() == 0 {
                continue;
            }
            if !all_functions && !s.is_global() {
                continue;
            }
            let name = s.name().unwrap_or("?").to_string();
            funcs.entry(s.address()).or_insert((name, s.size()));
        }
        let t0 = Instant::now();
        let idx = hotpatch_patcher::x86_64::branches::for_file(Path::new(f)).expect("index");
        let build = t0.elapsed();
        let mut by_code: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut ok = 0;
        let (mut padded, mut calls) = (0usize, 0usize);
        let mut codes = BTreeSet::new();
        for (&addr, (name, size)) in &funcs {
            let r = hotpatch_patcher::preflight_in_image(Path::new(f), &data, addr as usize, Some(*size as usize))
                .expect("preflight");
            if r.padding > 0 {
                padded += 1;
            }
            if r.overwritten.iter().any(|i| i.text.starts_with("call") || i.text == "syscall") {
                calls += 1;
            }
            match &r.verdict {
                Ok(()) => ok += 1,
                Err(e) => {
                    *by_code.entry(e.code).or_default() += 1;
                    codes.insert(e.code);
                    refusals.push(format!("{f}: {name}: {}", e.message));
                }
            }
        }
        tot += funcs.len();
        tot_ok += ok;
        let codes: Vec<String> = by_code.iter().map(|(c, n)| format!("{c} {n}")).collect();
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {} | {:.1} ms ({} KiB decoded, {} branches) |",
            Path::new(f).file_name().unwrap_or_default().to_string_lossy(),
            funcs.len(),
            ok,
            100.0 * ok as f64 / funcs.len().max(1) as f64,
            if codes.is_empty() { "-".into() } else { codes.join(", ") },
            calls,
            padded,
            build.as_secs_f64() * 1e3,
            idx.decoded_bytes / 1024,
            idx.branch_count(),
        );
    }
    println!(
        "| **all** | {tot} | {tot_ok} | {:.2} | | | | |",
        100.0 * tot_ok as f64 / tot.max(1) as f64
    );
    println!();
    for r in refusals {
        println!("{r}");
    }
}
