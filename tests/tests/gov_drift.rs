//! Dependency drift: two builds of a plugin that agree on rustc and the ABI
//! but resolved a shared crate (`gov-shared`) differently — 1.0.0 in the
//! main workspace's lock file, 2.0.0 in tests/plugins/gov-plugin/drift's.
//! The host (fixture `gov-host`, which records its own resolution in
//! `.hotpatch_host` at build time) refuses the second before `dlopen`, with a
//! table; `check_plugin` prints the same table offline.

mod gov_common;

use gov_common::{copy_plugin, drift_plugin, gov_host, gov_plugin, loads, refused};
use hotpatch_loader::{HostManifest, Policy, check_plugin};
use hotpatch_tests::loader_fixtures::{TempDir, assert_host_works, serial};

fn host_policy() -> Policy {
    let m = HostManifest::from_elf(gov_host())
        .expect("read gov-host")
        .expect("gov-host declares itself");
    assert_eq!(m.api_version.to_string(), "1.3.0");
    let shared: Vec<_> = m
        .shared
        .iter()
        .map(|c| (c.name.as_str(), c.version.as_str()))
        .collect();
    assert_eq!(shared, [("gov-shared", "1.0.0")]);
    Policy::new().with_host(m)
}

#[test]
fn the_plugin_of_the_hosts_lock_file_loads() {
    let _g = serial();
    let dir = TempDir::new("gov-nodrift");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_nodrift.so");
    loads(&so, &host_policy()).unload().expect("unload");
}

#[test]
fn a_plugin_built_against_another_version_is_refused_with_a_table() {
    let _g = serial();
    let dir = TempDir::new("gov-drift");
    let so = copy_plugin(&drift_plugin(), &dir, "libgov_drift.so");
    let e = refused(&so, &host_policy(), "E_PLG_DEP_DRIFT");
    let msg = e.to_string();
    let row = msg
        .lines()
        .find(|l| l.trim_start().starts_with("gov-shared"))
        .unwrap_or_else(|| panic!("no gov-shared row in:\n{msg}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells, ["gov-shared", "1.0.0", "2.0.0", "DRIFT"], "{msg}");
    assert!(
        msg.lines()
            .any(|l| l.contains("crate") && l.contains("host") && l.contains("plugin")),
        "{msg}"
    );
    // A host that records no shared crates does not compare them.
    loads(&so, &Policy::new()).unload().expect("unload");
    assert_host_works();
}

#[test]
fn check_plugin_prints_the_same_table_offline() {
    let host = gov_host();
    let bad = check_plugin(drift_plugin(), &host).expect("report");
    assert!(bad.host_declared);
    assert_eq!(bad.name, "gov-plugin-drift");
    assert_eq!(
        bad.verdict.as_ref().map(|e| e.code()),
        Some("E_PLG_DEP_DRIFT")
    );
    let text = bad.to_string();
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["gov-shared", "1.0.0", "2.0.0", "DRIFT"]),
        "{text}"
    );
    assert!(text.contains("verdict: E_PLG_DEP_DRIFT"), "{text}");
    let good = check_plugin(gov_plugin(), &host).expect("report");
    assert!(good.verdict.is_none(), "{good}");
    assert!(good.to_string().contains("verdict: OK"));
    assert!(
        good.to_string()
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["gov-shared", "1.0.0", "1.0.0", "ok"]),
        "{good}"
    );
    // An executable that declares nothing: the default host, no drift check.
    let plain = check_plugin(drift_plugin(), "/bin/true").expect("report");
    assert!(!plain.host_declared && plain.verdict.is_none(), "{plain}");
}
