//! The library crates' examples build and print what they promise: each is
//! run as a real process and its output checked.

use std::process::Command;

use hotpatch_tests::fixtures;

fn run(package: &str, name: &str, features: &[&str]) -> String {
    let exe = fixtures::example(package, name, features);
    let out = Command::new(&exe).output().expect("run example");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn patcher_example_patches_swaps_and_restores() {
    let out = run("hotpatch-patcher", "patch_function", &[]);
    for line in [
        "before: price(3) = 300",
        "patchable: true",
        "patched: price(3) = 270",
        "original: price(3) = 300",
        "swapped: price(3) = 240",
        "removed: price(3) = 300",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
    }
}

#[test]
fn verify_example_finds_the_patch_safe() {
    let out = run("hotpatch-patcher", "verify_patch", &["verify"]);
    assert!(out.lines().any(|l| l == "safe: true"), "{out}");
}

#[test]
fn symbolizer_example_names_its_function() {
    let out = run("hotpatch-symbolizer", "symbolize", &[]);
    assert!(out.contains("value: 42"), "{out}");
    let named = out
        .lines()
        .find(|l| l.starts_with("0x"))
        .unwrap_or_else(|| panic!("no address line in:\n{out}"));
    assert!(named.contains("a_function_to_find"), "{out}");
    assert!(out.contains("symbolize.rs:"), "DWARF line info: {out}");
}
