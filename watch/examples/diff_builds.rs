//! `hotpatch watch`'s library half without the CLI: two builds of a tiny
//! crate (compiled here with `rustc --emit=obj`, before and after an
//! edit) are read as object sets and diffed per function — what `watch`
//! does on every save before it builds a patch bundle. Run with
//! `cargo run -p hotpatch-watch --example diff_builds`.

use std::path::{Path, PathBuf};
use std::process::Command;

use hotpatch_watch::bundle::{diff, display_name};
use hotpatch_watch::objects::ObjSet;

const BEFORE: &str = "
pub fn price(qty: u64) -> u64 { qty * 100 }
pub fn tax(price: u64) -> u64 { price / 5 }
";

/// The edit: `price` changes and calls a new function; `tax` is untouched.
const AFTER: &str = "
pub fn price(qty: u64) -> u64 { discount(qty * 100) }
pub fn discount(price: u64) -> u64 { price - price / 10 }
pub fn tax(price: u64) -> u64 { price / 5 }
";

/// Compiles `src` as crate `tiny` into `dir/tiny.o`; returns `dir`.
fn build(dir: &Path, src: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let rs = dir.join("tiny.rs");
    std::fs::write(&rs, src)?;
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .args(["--crate-type=lib", "--crate-name=tiny", "--edition=2021"])
        .args([
            "-C",
            "opt-level=0",
            "-C",
            "metadata=example",
            "--emit=obj",
            "-o",
        ])
        .arg(dir.join("tiny.o"))
        .arg(&rs)
        .output()?;
    if !out.status.success() {
        return Err(format!("rustc: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(dir.to_path_buf())
}

fn names(v: &[String]) -> String {
    let mut n: Vec<String> = v.iter().map(|m| display_name(m)).collect();
    n.sort();
    n.join(", ")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::temp_dir().join(format!("watch-example-{}", std::process::id()));
    let before = ObjSet::read_dir(&build(&root.join("before"), BEFORE)?)?;
    let after = ObjSet::read_dir(&build(&root.join("after"), AFTER)?)?;
    let functions = |s: &ObjSet| {
        let mut v: Vec<String> = s.defs.keys().map(|m| display_name(m)).collect();
        v.sort();
        v.join(", ")
    };
    println!("before: {}", functions(&before));
    println!("after: {}", functions(&after));
    let d = diff(&before, &after);
    println!("changed: {}", names(&d.changed));
    println!("added: {}", names(&d.added));
    println!("statics changed: {}", d.statics_changed.len());
    let same = diff(&before, &before);
    println!("a build against itself: {} changed", same.changed.len());
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
