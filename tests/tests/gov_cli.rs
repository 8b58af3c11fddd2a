//! The governance commands of the `hotpatch` binary: `keygen`, `sign`,
//! `check-plugin` (offline) and `stats` (against a live `demo-target
//! serve`, its Prometheus output read by a real parser).

mod gov_common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use gov_common::{copy_plugin, drift_plugin, gov_host, gov_plugin};
use hotpatch_loader::{Policy, PublicKey, load};
use hotpatch_tests::agent_bins::{Serve, bins, text};
use hotpatch_tests::loader_fixtures::{TempDir, serial};
use prometheus_parse::{Scrape, Value as PValue};

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "hotpatch failed:\n{}", text(&o));
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn keygen_then_sign_makes_a_plugin_the_loader_accepts() {
    let _g = serial();
    let b = bins();
    let dir = TempDir::new("gov-cli-sign");
    let key = dir.join("ops.key");
    let o = ok(std::process::Command::new(&b.hotpatch)
        .args(["keygen", key.to_str().expect("utf-8")])
        .output()
        .expect("keygen"));
    assert!(stdout(&o).contains("ops.key.pub"), "{}", text(&o));
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // keygen never overwrites a key.
    let again = std::process::Command::new(&b.hotpatch)
        .args(["keygen", key.to_str().expect("utf-8")])
        .output()
        .expect("keygen again");
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));

    let so = copy_plugin(&gov_plugin(), &dir, "libgov_cli.so");
    ok(std::process::Command::new(&b.hotpatch)
        .args([
            "sign",
            so.to_str().expect("utf-8"),
            "--key",
            key.to_str().expect("utf-8"),
        ])
        .output()
        .expect("sign"));
    let public = PublicKey::read_file(dir.join("ops.key.pub")).expect("public key");
    let p = load(&so, &Policy::new().trust_key(public).require_signature()).expect("signed loads");
    p.unload().expect("unload");
}

#[test]
fn check_plugin_prints_the_drift_table_and_fails_with_its_code() {
    let b = bins();
    let host = gov_host();
    let run = |plugin: &std::path::Path, json: bool| {
        let mut c = std::process::Command::new(&b.hotpatch);
        c.args(["check-plugin", plugin.to_str().expect("utf-8"), "--exe"])
            .arg(&host);
        if json {
            c.arg("--json");
        }
        c.output().expect("check-plugin")
    };
    let bad = run(&drift_plugin(), false);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("E_PLG_DEP_DRIFT"),
        "{}",
        text(&bad)
    );
    let table = stdout(&bad);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["gov-shared", "1.0.0", "2.0.0", "DRIFT"]),
        "{table}"
    );
    let good = ok(run(&gov_plugin(), true));
    let v: serde_json::Value = serde_json::from_slice(&good.stdout).expect("json");
    assert_eq!(v["verdict"], "OK", "{v}");
    assert_eq!(v["host_api"], "1.3.0");
    assert_eq!(v["shared"][0]["crate"], "gov-shared");
    assert_eq!(v["shared"][0]["host"], "1.0.0");
    assert_eq!(v["shared"][0]["plugin"], "1.0.0");
}

#[test]
fn an_agent_in_a_declared_host_refuses_a_drifted_plugin() {
    use std::io::BufRead as _;
    let b = bins();
    let host = gov_host();
    let drift = drift_plugin();
    let dir = TempDir::new("gov-cli-host");
    let run = dir.join("run");
    std::fs::create_dir(&run).expect("mkdir");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut child = std::process::Command::new(&host)
        .arg("serve")
        .env("XDG_RUNTIME_DIR", &run)
        .env("TMPDIR", &run)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn gov-host serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let socket = line
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("gov-host said {line:?}"))
        .to_owned();
    let load = |so: &std::path::Path| {
        std::process::Command::new(&b.hotpatch)
            .args(["load", so.to_str().expect("utf-8"), "--socket", &socket])
            .env("XDG_RUNTIME_DIR", &run)
            .env("TMPDIR", &run)
            .output()
            .expect("hotpatch load")
    };
    let bad = copy_plugin(&drift, &dir, "libgov_drift_host.so");
    let o = load(&bad);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("E_PLG_DEP_DRIFT") && err.contains("2.0.0"),
        "{}",
        text(&o)
    );
    assert!(
        !gov_common::marker(&bad).exists(),
        "the drifted plugin ran code"
    );
    let good = copy_plugin(&gov_plugin(), &dir, "libgov_good_host.so");
    ok(load(&good));
    assert!(gov_common::marker(&good).exists());
    drop(child.stdin.take());
    let limit = std::time::Duration::from_secs(120);
    let st = hotpatch_tests::proc::wait_until(
        &mut child,
        std::time::Instant::now() + limit,
        limit,
        "gov-host after its stdin closed",
    );
    assert!(st.success(), "gov-host exited with {st}");
}

#[test]
fn stats_prometheus_from_a_live_process_parses() {
    let s = Serve::start();
    let v1 = s.bins.plugin("pricing-v1");
    let v1 = v1.to_str().expect("utf-8");
    ok(s.run(&["load", v1]));
    let dup = s.run(&["load", v1]);
    assert_eq!(dup.status.code(), Some(1), "{}", text(&dup));
    ok(s.run(&[
        "patch",
        "demo_price",
        "--with",
        "pricing-v1:pricing_v1_quote",
    ]));
    ok(s.run(&["disable", "demo_price"]));
    ok(s.run(&["enable", "demo_price"]));
    ok(s.run(&["revert", "demo_price"]));

    let human = stdout(&ok(s.run(&["stats"])));
    assert!(
        human.contains("pricing-v1") && human.contains("demo_price"),
        "{human}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&ok(s.run(&["stats", "--json"])).stdout).expect("json");
    assert!(json.get("prometheus").is_none(), "{json}");
    let plugin = json["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .find(|p| p["path"] == v1)
        .unwrap_or_else(|| panic!("no figures for {v1}: {json}"));
    assert_eq!(plugin["name"], "pricing-v1");
    assert_eq!(plugin["loads"], 1);
    assert_eq!(plugin["failures"]["E_PLG_ALREADY_LOADED"], 1);
    assert_eq!(plugin["success_rate"], 0.5);
    assert_eq!(plugin["state"], "loaded");
    let p50 = plugin["load_seconds_p50"].as_f64().expect("p50");
    let p99 = plugin["load_seconds_p99"].as_f64().expect("p99");
    assert!(p50 > 0.0 && p99 >= p50, "{plugin}");
    let site = json["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .find(|x| x["name"] == "demo_price")
        .unwrap_or_else(|| panic!("no site figures: {json}"));
    for (k, n) in [
        ("installs", 1),
        ("disables", 1),
        ("enables", 1),
        ("reverts", 1),
        ("swaps", 0),
    ] {
        assert_eq!(site[k], n, "{k}: {site}");
    }
    assert_eq!(site["state"], "reverted");
    assert!(
        site["enabled_seconds"].as_f64().expect("seconds") > 0.0,
        "{site}"
    );
    let prom = stdout(&ok(s.run(&["stats", "--prometheus"])));
    let scrape = Scrape::parse(prom.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let value = |name: &str, want: &[(&str, &str)]| -> f64 {
        let hits: Vec<f64> = scrape
            .samples
            .iter()
            .filter(|x| x.metric == name && want.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| match x.value {
                PValue::Counter(v) | PValue::Gauge(v) | PValue::Untyped(v) => v,
                ref o => panic!("{o:?}"),
            })
            .collect();
        assert_eq!(hits.len(), 1, "{name} {want:?} in:\n{prom}");
        hits[0]
    };
    assert_eq!(value("hotpatch_plugin_loads_total", &[("path", v1)]), 1.0);
    assert_eq!(
        value(
            "hotpatch_plugin_load_failures_total",
            &[("path", v1), ("code", "E_PLG_ALREADY_LOADED")]
        ),
        1.0
    );
    assert_eq!(
        value("hotpatch_plugin_load_success_ratio", &[("path", v1)]),
        0.5
    );
    assert_eq!(
        value("hotpatch_site_installs_total", &[("name", "demo_price")]),
        1.0
    );
    assert_eq!(
        value("hotpatch_site_reverts_total", &[("name", "demo_price")]),
        1.0
    );
    assert_eq!(
        value(
            "hotpatch_site_state",
            &[("name", "demo_price"), ("state", "reverted")]
        ),
        1.0
    );
}
