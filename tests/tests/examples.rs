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

fn has_lines(out: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            out.lines().any(|l| l == *line),
            "missing {line:?} in:\n{out}"
        );
    }
}

#[test]
fn sys_example_lists_the_loaded_objects_and_reads_its_own_code() {
    let out = run("hotpatch-sys", "loaded_modules", &[]);
    has_lines(
        &out,
        &[
            "libc loaded: true",
            "mapping is the executable: true",
            "mapping executable: true",
            "read here(): true",
            "read address 8: false",
            "here() = 7",
        ],
    );
    let n: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("objects: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no object count in:\n{out}"));
    assert!(n >= 2, "the program and libc at least: {out}");
}

#[test]
fn heap_example_writes_a_profile_that_names_its_allocating_function() {
    let dir = loader_fixtures::TempDir::new("heap-example");
    let pb = dir.join("heap.pb.gz");
    let out = run_with("hotpatch-heap", "heap_profile", &[], &[&pb]);
    has_lines(
        &out,
        &[
            "names allocate_blocks: true",
            "running after stop: false",
            &format!("wrote: {}", pb.display()),
        ],
    );
    assert!(std::fs::metadata(&pb).is_ok_and(|m| m.len() > 0), "{out}");
    let samples: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("samples: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sample count in:\n{out}"));
    assert!(samples > 0, "{out}");
    // 16 MiB kept alive at one sample per 64 KiB: the estimate's standard
    // deviation is about 1 MiB; [8, 32] MiB is many deviations wide.
    let mib: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("in-use estimate: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no estimate in:\n{out}"));
    assert!((8.0..=32.0).contains(&mib), "{out}");
}

#[test]
fn watch_example_diffs_two_builds_per_function() {
    let out = run("hotpatch-watch", "diff_builds", &[]);
    has_lines(
        &out,
        &[
            "changed: tiny::price",
            "added: tiny::discount",
            "statics changed: 0",
            "a build against itself: 0 changed",
        ],
    );
    let before = out
        .lines()
        .find_map(|l| l.strip_prefix("before: "))
        .unwrap_or_else(|| panic!("no function list in:\n{out}"));
    assert!(before.contains("tiny::tax"), "{out}");
}

#[test]
fn protocol_example_round_trips_a_request_and_a_typed_reply() {
    let out = run("hotpatch-protocol", "wire", &[]);
    has_lines(
        &out,
        &[
            "parsed back equal: true",
            "decoded back equal: true",
            "site #1 demo_price (enabled)",
            "unload result as a site: refused",
            "refused: E_AGENT_BAD_JSON",
            "refused: E_AGENT_UNKNOWN_COMMAND",
            "refused: E_AGENT_BAD_ARGS",
        ],
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("request: ") && l.contains(r#""cmd":"patch""#)),
        "{out}"
    );
}

#[test]
fn agent_example_serves_status_on_a_private_socket() {
    let out = run("hotpatch-agent", "agent_status", &[]);
    has_lines(
        &out,
        &[
            "listening: true",
            "status pid matches: true",
            "host requests: 42",
            "plugins: 0, sites: 0",
            "bad line: E_AGENT_UNKNOWN_COMMAND",
            "still serving: ping pid matches true",
            "socket removed: true",
        ],
    );
}
