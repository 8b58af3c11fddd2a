//! No file-level import cycle inside any crate of the workspace
//! (`scripts/import-cycles.py`, run over every member listed in the root
//! `Cargo.toml`), and the script itself finds a cycle it is shown.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(args: &[&Path]) -> (i32, String) {
    let out = Command::new("python3")
        .arg(root().join("scripts/import-cycles.py"))
        .args(args)
        .output()
        .expect("python3 runs (it is needed by this test)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

/// The detector is shown a crate with one knot (a -> b -> a, through a
/// `use` group and a `super::` path), a parent naming its child (not a
/// cycle) and a unit test naming another file (not counted).
#[test]
fn the_script_finds_a_cycle_and_ignores_the_module_tree() {
    let dir = std::env::temp_dir().join(format!("import-cycles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write(
        &dir,
        "src/lib.rs",
        "mod a;\nmod b;\nmod c;\npub use a::A;\n",
    );
    write(
        &dir,
        "src/a.rs",
        "use crate::{b::B, c};\npub struct A(B);\n",
    );
    write(
        &dir,
        "src/b.rs",
        "pub struct B;\nfn f() -> super::a::A { todo!() }\n// crate::c::x in a comment\n",
    );
    write(
        &dir,
        "src/c.rs",
        "pub mod d;\npub fn x() { d::y() }\n#[cfg(test)]\nmod tests { use crate::a::A; }\n",
    );
    write(
        &dir,
        "src/c/d.rs",
        "pub fn y() {}\nconst S: &str = \"crate::a::A\";\n",
    );
    let (code, out) = run(&[&dir]);
    assert_eq!(code, 1, "{out}");
    let cycles: Vec<&str> = out.lines().filter(|l| l.contains(" -> ")).collect();
    assert_eq!(cycles.len(), 1, "{out}");
    assert!(cycles[0].ends_with("a.rs -> b.rs -> a.rs"), "{out}");
    // Without the back edge there is none.
    write(&dir, "src/b.rs", "pub struct B;\n");
    let (code, out) = run(&[&dir]);
    assert_eq!(code, 0, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every crate of the workspace: the script reads the member list, so a new
/// crate is checked without touching this test. All cycles are reported at
/// once.
#[test]
fn no_crate_of_the_workspace_has_an_import_cycle() {
    let (code, out) = run(&[]);
    assert!(out.contains("cycle(s) in"), "the script ran: {out}");
    assert_eq!(code, 0, "file-level import cycles:\n{out}");
}
