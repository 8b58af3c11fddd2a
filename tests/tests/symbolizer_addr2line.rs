//! `hotpatch symbolize` against binutils' `addr2line` on a fixture built from
//! source: the outputs must be identical, line for line.
//!
//! Addresses: every function symbol's start plus one pseudo-random address
//! inside it (st_value..st_value+st_size), i.e. PCs a profiler can see.
//! Addresses in padding between functions are excluded on purpose: binutils
//! names them after the nearest preceding symbol whatever its size, we
//! answer `??` (a symbol must cover the address).

use std::path::Path;
use std::process::Command;

use object::{Object as _, ObjectSymbol as _, SymbolKind};

fn addresses(so: &Path) -> Vec<u64> {
    let data = std::fs::read(so).expect("read fixture");
    let file = object::File::parse(&*data).expect("parse fixture");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::new();
    for s in file.symbols() {
        if s.kind() == SymbolKind::Text && s.size() > 0 && s.address() != 0 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.push(s.address());
            out.push(s.address() + seed % s.size());
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn ours(so: &Path, addrs: &[String], inlines: bool) -> String {
    let args = hotpatch_cli::symbolize::Args {
        exe: so.to_path_buf(),
        inlines,
        json: false,
        source_names: false,
        debug_roots: Vec::new(),
        addrs: addrs.to_vec(),
    };
    let mut out = Vec::new();
    let code = hotpatch_cli::symbolize::run(&args, &mut out).expect("symbolize");
    assert_eq!(code, 0);
    String::from_utf8(out).expect("utf-8")
}

fn binutils(so: &Path, addrs: &[String], inlines: bool) -> String {
    let mut cmd = Command::new("addr2line");
    cmd.args(["-f", "-C"]);
    if inlines {
        cmd.arg("-i");
    }
    let out = cmd
        .arg("-e")
        .arg(so)
        .args(addrs)
        .output()
        .expect("run addr2line");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn identical_to_binutils_addr2line_on_a_fixture() {
    let so = hotpatch_tests::fixtures::plugin("sym-a");
    let addrs: Vec<String> = addresses(&so).iter().map(|a| format!("{a:x}")).collect();
    assert!(addrs.len() >= 300, "only {} addresses", addrs.len());
    for inlines in [false, true] {
        let (theirs, ours) = (binutils(&so, &addrs, inlines), ours(&so, &addrs, inlines));
        let (t, o): (Vec<&str>, Vec<&str>) = (theirs.lines().collect(), ours.lines().collect());
        assert_eq!(t.len(), o.len(), "line counts differ (inlines={inlines})");
        let diffs: Vec<_> = t
            .iter()
            .zip(&o)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .collect();
        assert!(
            diffs.is_empty(),
            "{} of {} lines differ (inlines={inlines}), first: {:?}",
            diffs.len(),
            t.len(),
            diffs.iter().take(5).collect::<Vec<_>>()
        );
        // Real content, not two empty answers agreeing.
        let known = o.iter().filter(|l| l.contains("sym-a/src/lib.rs:")).count();
        assert!(known >= 3, "{known} lines in sym-a's own source");
    }
}

#[test]
fn unknown_addresses_print_like_binutils() {
    let so = hotpatch_tests::fixtures::plugin("sym-a");
    let addrs: Vec<String> = ["0", "ffffffffffff", "0x10"].map(String::from).to_vec();
    assert_eq!(ours(&so, &addrs, true), binutils(&so, &addrs, true));
    assert_eq!(ours(&so, &addrs, true), "??\n??:0\n".repeat(3));
}
