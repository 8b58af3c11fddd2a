//! `hotpatch heap …` and `hotpatch leak-check` against a running
//! `demo-target serve`: sampling switched on in the live process, a leak
//! check of a leaking and a clean plugin, snapshots diffed, errors with
//! their codes, the process still serving after `heap stop`.

use std::process::{Command, Output};

use hotpatch_tests::agent_bins::Serve;
use hotpatch_tests::fixtures;
use serde_json::Value;

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

fn fails_with(o: &Output, code: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(code), "expected {code}:\n{}", text(o));
}

#[test]
fn heap_commands_and_leak_check_on_a_live_process() {
    let leaky = fixtures::plugin("heap-leak");
    let clean = fixtures::plugin("heap-clean");
    let s = Serve::start();
    let dir = s.runtime_dir.clone();
    let before = dir.join("before.pb.gz");
    let after = dir.join("after.pb.gz");
    let p = |x: &std::path::Path| x.display().to_string();

    fails_with(
        &s.run(&["heap", "snapshot", "-o", &p(&before)]),
        "E_HEAP_NOT_STARTED",
    );
    fails_with(&s.run(&["heap", "stop"]), "E_HEAP_NOT_STARTED");
    fails_with(&s.run(&["heap", "start", "--rate", "0"]), "E_HEAP_BAD_RATE");

    let v = json(&ok(s.run(&["heap", "start", "--rate", "16KiB", "--json"])));
    assert_eq!(v["rate"], 16384, "{v}");
    assert!(
        v["allocator"]
            .as_str()
            .is_some_and(|a| a.contains("libc.so")),
        "{v}"
    );
    fails_with(&s.run(&["heap", "start"]), "E_HEAP_ALREADY_STARTED");

    let snap = ok(s.run(&["heap", "snapshot", "-o", &p(&before)]));
    // The in-use figure comes with its sampling error.
    let line = String::from_utf8_lossy(&snap.stdout).into_owned();
    assert!(
        line.starts_with("in use: ")
            && line.contains(" bytes (±")
            && line.contains("1 sd of sampling error"),
        "{line}"
    );

    let v = json(&ok(s.run(&[
        "leak-check",
        &p(&leaky),
        "--cycles",
        "20",
        "--json",
    ])));
    let truth = 20.0 * f64::from(1 << 20);
    let got = v["inuse_bytes"].as_f64().unwrap_or(0.0);
    assert!(
        (got - truth).abs() / truth < 0.15,
        "leaker: {got} vs {truth}: {v}"
    );
    assert_eq!(v["leaking_function"], "heap_leak_leak_block", "{v}");
    assert_eq!(v["leaks"], true, "{v}");
    assert_eq!(v["stayed_mapped"], Value::Null, "{v}");

    let table = ok(s.run(&["leak-check", &p(&clean), "--cycles", "20"]));
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(
        t.contains("heap-clean") && t.contains("no leak beyond sampling noise"),
        "{t}"
    );

    ok(s.run(&["heap", "snapshot", "-o", &p(&after)]));
    // The diff is offline: no --pid.
    let d = s
        .cli()
        .args(["heap", "diff", &p(&before), &p(&after), "--json"])
        .output()
        .expect("run hotpatch heap diff");
    let d = json(&ok(d));
    let leak_rows: i64 = d["stacks"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| {
                    r["stack"]
                        .as_array()
                        .is_some_and(|st| st.iter().any(|f| f == "heap_leak_leak_block"))
                })
                .map(|r| r["inuse_space"].as_i64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    assert!(
        (leak_rows as f64 - truth).abs() / truth < 0.15,
        "diff attributes {leak_rows} bytes to heap_leak_leak_block: {d}"
    );
    let bad = s
        .cli()
        .args(["heap", "diff", "/nonexistent.pb.gz", &p(&after)])
        .output()
        .expect("run hotpatch heap diff");
    fails_with(&bad, "E_HEAP_IO");

    let v = json(&ok(s.run(&["heap", "stop", "--json"])));
    assert_eq!(v["stopped"], true, "{v}");
    fails_with(&s.run(&["heap", "stop"]), "E_HEAP_NOT_STARTED");
    // Still serving.
    ok(s.run(&["status"]));

    let top = Command::new("go")
        .args(["tool", "pprof", "-sample_index=inuse_space", "-top"])
        .arg(&after)
        .env("HOME", &dir)
        .output()
        .expect("`go` is needed for this test");
    let out = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{}", text(&top));
    assert!(out.contains("heap_leak_leak_block"), "{out}");
}
