//! Coverage of the patcher over real ELF files: the preflight verdict
//! (exactly what install decides, with the module's branch index) for every
//! function of each file given.
//!
//! ```text
//! cargo run --release -p hotpatch-patcher --example coverage -- [--all-functions] FILE...
//! ```
//! Default: the exported (`.dynsym`, defined, global) functions with a size;
//! `--all-functions`: every function symbol with a size (`.symtab` too), as
//! for a program's own functions. `--install`: also `dlopen` each file and
//! put a real pass-through site on every function (install, swap the slot to
//! the site's own `original()`), then remove them all; the "installed"
//! column counts those (a shared library only). Prints one table row per
//! file, then every refusal with its code and message.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use object::{Object, ObjectSymbol, SymbolKind};

fn main() {
    let mut all_functions = false;
    let mut install = false;
    let mut files = Vec::new();
    for a in std::env::args().skip(1) {
        if a == "--all-functions" {
            all_functions = true;
        } else if a == "--install" {
            install = true;
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
        "| file | functions | patchable | % | refusals by code | call/syscall relocated | into padding | index build | installed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
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
        let (mut padded, mut calls, mut holes) = (0usize, 0usize, 0usize);
        let mut codes = BTreeSet::new();
        for (&addr, (name, size)) in &funcs {
            let r = hotpatch_patcher::preflight_in_image(
                Path::new(f),
                &data,
                hotpatch_patcher::FileVirtAddr(addr),
                Some(*size as usize),
            )
            .expect("preflight");
            if r.padding > 0 {
                padded += 1;
            }
            if r.hole.is_some() {
                holes += 1;
            }
            if r.overwritten
                .iter()
                .any(|i| i.text.starts_with("call") || i.text == "syscall")
            {
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
        let installed = if install {
            install_all(f, &funcs, &mut refusals)
        } else {
            "-".to_string()
        };
        tot += funcs.len();
        tot_ok += ok;
        let codes: Vec<String> = by_code.iter().map(|(c, n)| format!("{c} {n}")).collect();
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {} | {:.1} ms ({} KiB decoded, {} branches) | {} |",
            Path::new(f)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            funcs.len(),
            ok,
            100.0 * ok as f64 / funcs.len().max(1) as f64,
            if codes.is_empty() {
                "-".into()
            } else {
                codes.join(", ")
            },
            calls,
            if holes == 0 {
                padded.to_string()
            } else {
                format!("{padded} ({holes} by jmp rel8 to a hole)")
            },
            build.as_secs_f64() * 1e3,
            idx.decoded_bytes / 1024,
            idx.branch_count(),
            installed,
        );
    }
    println!(
        "| **all** | {tot} | {tot_ok} | {:.2} | | | | | |",
        100.0 * tot_ok as f64 / tot.max(1) as f64
    );
    println!();
    for r in refusals {
        println!("{r}");
    }
}

extern "C" fn placeholder() {
    eprintln!("coverage: a pass-through site was called before its swap");
    std::process::abort();
}

/// Installs a pass-through site on every function of the shared library
/// `f`, then removes them all. Returns "installed/total (removed, bytes
/// restored)".
fn install_all(
    f: &str,
    funcs: &BTreeMap<u64, (String, u64)>,
    refusals: &mut Vec<String>,
) -> String {
    use hotpatch_patcher::{InstallOptions, Site};
    let c = std::ffi::CString::new(f).expect("path");
    // SAFETY: dlopen of a system library; never closed.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {f}");
    let reg = hotpatch_symbolizer::Registry::global();
    reg.refresh().expect("refresh");
    let bias = reg
        .modules()
        .into_iter()
        .filter(|m| m.mapped_at(reg.current_seq()))
        .find_map(|m| {
            let e = m.elf()?;
            (std::fs::canonicalize(&e.path).ok()? == std::fs::canonicalize(f).ok()?)
                .then_some(e.bias.0)
        })
        .expect("the library is registered") as usize;
    let mut sites = Vec::new();
    let mut saved = Vec::new();
    for (&vaddr, (name, size)) in funcs {
        let addr = vaddr as usize + bias;
        // SAFETY: a function of a library that stays loaded.
        saved.push((
            addr,
            unsafe { std::slice::from_raw_parts(addr as *const u8, *size as usize) }.to_vec(),
        ));
        let opts = InstallOptions {
            known_size: Some(*size as usize),
            name: Some(name.clone()),
            ..Default::default()
        };
        // SAFETY: `addr` is a function entry of the loaded library; the
        // placeholder is swapped for the site's original at once, and no
        // other thread of this program calls the library.
        match unsafe { Site::install(addr as *const u8, placeholder as *const u8, &opts) } {
            Ok(mut s) => {
                let o = s.original();
                // SAFETY: the trampoline is the original function.
                unsafe { s.swap(o) }.expect("swap");
                sites.push(s);
            }
            Err(e) => refusals.push(format!("{f}: {name}: install: {e}")),
        }
    }
    let n = sites.len();
    for mut s in sites {
        s.remove().expect("remove");
    }
    let restored = saved
        .iter()
        // SAFETY: as above.
        .all(|(a, b)| unsafe { std::slice::from_raw_parts(*a as *const u8, b.len()) } == &b[..]);
    format!("{n}/{} (removed, bytes restored: {restored})", funcs.len())
}
