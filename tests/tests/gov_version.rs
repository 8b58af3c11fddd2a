//! Host-API version ranges: a plugin declares the semver range of host APIs
//! it needs (`declare_plugin!(..., host = ">=1.0, <2")`, in its
//! `.hotpatch_req` section); the host compares its own version, read from
//! the file before `dlopen`. Plugins that predate the section still load.

mod gov_common;

use gov_common::{copy_plugin, gov_plugin, loads, refused};
use hotpatch_loader::{HostManifest, Policy, Requirements};
use hotpatch_tests::loader_fixtures::{
    C_ENTRY_POINTS, TempDir, assert_host_works, c_descriptor, cc_shared, serial,
};

fn host(v: &str) -> Policy {
    Policy::new().with_host(HostManifest::new(v.parse().expect("version")))
}

#[test]
fn in_range_hosts_load_the_plugin() {
    let _g = serial();
    let dir = TempDir::new("gov-inrange");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_inrange.so");
    for v in ["1.0.0", "1.3.0", "1.99.7"] {
        loads(&so, &host(v)).unload().expect("unload");
    }
    // The default host version (plugin-api's HOST_API_VERSION) is in range.
    loads(&so, &Policy::new()).unload().expect("unload");
}

#[test]
fn out_of_range_hosts_refuse_before_dlopen_with_both_versions() {
    let _g = serial();
    let dir = TempDir::new("gov-outrange");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_outrange.so");
    for v in ["0.9.0", "2.0.0", "2.0.0-rc.1", "1.0.0-alpha"] {
        let e = refused(&so, &host(v), "E_PLG_HOST_VERSION");
        let msg = e.to_string();
        assert!(msg.contains(">=1.0, <2") && msg.contains(v), "{msg}");
    }
    assert_host_works();
}

#[test]
fn a_plugin_without_requirements_still_loads() {
    let _g = serial();
    let dir = TempDir::new("gov-old");
    // A plugin as built before `.hotpatch_req` existed: descriptor and entry
    // points only.
    let so = cc_shared(
        &dir.join("libgov_old.so"),
        &format!("{}{C_ENTRY_POINTS}", c_descriptor("gov-old")),
        &[],
    );
    let p = hotpatch_loader::load(&so, &host("9.0.0")).expect("an old plugin loads");
    p.unload().expect("unload");
}

#[test]
fn malformed_requirements_are_refused() {
    let _g = serial();
    let dir = TempDir::new("gov-badreq");
    for (i, body) in [
        "hotpatch-req v1\\nhost=not a range\\nshared=\\n",
        "something else\\n",
        "hotpatch-req v1\\nhost=>=1\\nshared=gov-shared\\n",
    ]
    .iter()
    .enumerate()
    {
        let req = format!(
            "__attribute__((section(\".hotpatch_req\"), used))\nconst char hotpatch_plugin_req[] = \"{body}\";\n"
        );
        let so = cc_shared(
            &dir.join(&format!("libgov_badreq{i}.so")),
            &format!("{}{C_ENTRY_POINTS}{req}", c_descriptor("gov-badreq")),
            &[],
        );
        let e = match hotpatch_loader::load(&so, &Policy::new()) {
            Ok(p) => panic!("loaded: {p:?}"),
            Err(e) => e,
        };
        assert_eq!(e.code(), "E_PLG_REQ_MALFORMED", "{body}: {e}");
    }
    assert_host_works();
}

#[test]
fn requirements_text_round_trip() {
    let r = Requirements::parse(b"hotpatch-req v1\nhost=^1.2\nshared=\nfuture=ignored\n")
        .expect("a newer writer's extra key is ignored");
    assert!(r.host.expect("range").matches(&"1.9.0".parse().expect("v")));
}
