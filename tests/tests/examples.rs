//! The library crates' examples build and print what they promise: each is
//! run as a real process and its output checked.

use std::process::Command;

use hotpatch_tests::{fixtures, loader_fixtures};

fn run(package: &str, name: &str, features: &[&str]) -> String {
    run_with(package, name, features, &[])
}

fn run_with(package: &str, name: &str, features: &[&str], args: &[&std::path::Path]) -> String {
    let exe = fixtures::example(package, name, features);
    let out = Command::new(&exe).args(args).output().expect("run example");
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

#[test]
fn loader_example_loads_calls_and_unloads_a_real_plugin() {
    // The fixture plugin is copied into a private directory, so the example's
    // "missing" probe beside it names a file that surely does not exist.
    let dir = loader_fixtures::TempDir::new("example");
    let copy = loader_fixtures::copy_with_mode(
        &loader_fixtures::good_plugin(),
        &dir.join("libplg_good.so"),
        0o755,
    );
    let out = run_with("hotpatch-loader", "load_plugin", &[], &[&copy]);
    for line in [
        "loaded: plg-good 1.0.0",
        "registered: true",
        "inits: 1",
        "plg_good_add(2, 3) = 5",
        "unloaded: plg-good unmapped",
        "registered after unload: false",
        "missing: E_PLG_NOT_FOUND",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
    }
}

#[test]
fn profiler_example_names_the_plugin_function_in_its_top_frames() {
    let so = fixtures::plugin("prof-work");
    let out = run_with("hotpatch-profiler", "profile_plugin", &[], &[&so]);
    assert!(out.lines().any(|l| l == "loaded: prof-work 1.0.0"), "{out}");
    let top: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("top frames"))
        .skip(1)
        .collect();
    assert!(!top.is_empty(), "no top frames in:\n{out}");
    // The plugin's function is named (not `libprof_work.so+0x...`) and has
    // samples of its own: the workload's whole CPU time was spent in it.
    let line = top
        .iter()
        .find(|l| l.ends_with("prof_work_burn"))
        .unwrap_or_else(|| panic!("prof_work_burn not among the top frames:\n{out}"));
    let flat: u64 = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no flat count in {line:?}"));
    assert!(flat > 0, "{out}");
}
