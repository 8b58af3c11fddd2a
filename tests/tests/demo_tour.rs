//! The README's main job, end to end: the demo tour (`demo-target` with no
//! arguments, here the fixture build) loads the plugins, patches, profiles,
//! swaps (after a refused swap of another signature), fixes a local
//! function, reverts and unloads, and writes a profile `go tool pprof`
//! reads with the plugin's frames named.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

use hotpatch_tests::agent_bins::bins;
use hotpatch_tests::loader_fixtures::TempDir;

#[test]
fn the_tour_runs_and_its_profile_names_the_plugin() {
    let b = bins();
    let dir = TempDir::new("tour");
    // Its own runtime directory: the tour's agent never meets the user's.
    let rt = hotpatch_tests::agent_bins::fresh_dir("tour-rt", 0o700);
    let mut cmd = Command::new(&b.demo);
    cmd.args(["tour", "--out"]).arg(dir.path());
    hotpatch_tests::agent_bins::isolate(&mut cmd, &rt);
    let out = hotpatch_tests::proc::output_within(
        &mut cmd,
        std::time::Duration::from_secs(1200),
        "demo-target tour",
    )
    .expect("run the tour");
    let _ = std::fs::remove_dir_all(&rt);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the tour failed:\n{text}");
    for want in [
        "[9/9]",
        "E_AGENT_SIGNATURE_MISMATCH",
        "(v1)",
        "(v2)",
        "tax 19%",
        "the counter was never reset",
        "pricing_v1_hash",
        "tour done",
    ] {
        assert!(
            stdout.contains(want),
            "{want:?} missing from the tour:\n{text}"
        );
    }
    let pb = dir.path().join("profile.pb.gz");
    assert!(dir.path().join("flamegraph.svg").is_file(), "{text}");
    if Command::new("go").arg("version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "go is required in CI (.ci/run installs golang-go)"
        );
        eprintln!("SKIP the go tool pprof check: `go` not installed");
        return;
    }
    let top = Command::new("go")
        .args(["tool", "pprof", "-top", "-symbolize=none"])
        .arg(&pb)
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap();
    let top_text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );
    assert!(top_text.contains("pricing_v1_hash"), "{top_text}");
}
