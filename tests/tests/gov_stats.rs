//! Health figures through a real in-process agent: plugin loads and
//! failures by code, success rate, load-time quantiles and state; per site
//! installs, disables, enables, reverts and time enabled. The Prometheus
//! text is read back by a real parser (the `prometheus-parse` crate).

mod gov_common;

use std::collections::HashMap;

use gov_common::{copy_plugin, gov_plugin};
use hotpatch_agent::client::Client;
use hotpatch_agent::protocol::Request;
use hotpatch_tests::loader_fixtures::{TempDir, serial};
use prometheus_parse::{Scrape, Value as PValue};
use serde_json::Value;

/// The function the test patches (same signature as the plugin's
/// `gov_plugin_shared_a`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn gov_stats_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(2)
}

fn call(c: &mut Client, req: Request) -> Value {
    c.call(&req).unwrap_or_else(|e| panic!("{req:?}: {e}"))
}

fn code(c: &mut Client, req: Request) -> String {
    let r = c.request(&req).expect("a reply");
    assert!(!r.ok, "{req:?} must fail: {r:?}");
    r.error.expect("error body").code
}

/// The value of the one sample of `name` whose labels include `want`.
fn sample(scrape: &Scrape, name: &str, want: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            PValue::Counter(v) | PValue::Gauge(v) | PValue::Untyped(v) => v,
            ref other => panic!("{name}: unexpected value {other:?}"),
        })
        .collect();
    assert_eq!(hits.len(), 1, "{name} {want:?}: {hits:?}");
    hits[0]
}

#[test]
fn stats_count_loads_failures_and_site_changes_and_parse_as_prometheus() {
    let _g = serial();
    let dir = TempDir::new("gov-stats");
    let so = copy_plugin(&gov_plugin(), &dir, "libgov_stats.so");
    let so_s = so.display().to_string();
    let agent = hotpatch_agent::Builder::new()
        .socket_dir(dir.join("sock"))
        .start()
        .expect("agent");
    let mut c = Client::connect(agent.socket_path()).expect("connect");

    call(&mut c, Request::Load { path: so_s.clone() });
    // A second load of the same file fails: one failure, one success.
    assert_eq!(
        code(&mut c, Request::Load { path: so_s.clone() }),
        "E_PLG_ALREADY_LOADED"
    );
    let missing = dir.join("libabsent.so").display().to_string();
    assert_eq!(
        code(
            &mut c,
            Request::Load {
                path: missing.clone()
            }
        ),
        "E_PLG_NOT_FOUND"
    );

    assert_eq!(gov_stats_target(5), 10);
    let site = call(
        &mut c,
        Request::Patch {
            target: "gov_stats_target".into(),
            with: "gov-plugin:gov_plugin_shared_a".into(),
            force: false,
        },
    );
    assert_eq!(gov_stats_target(5), 6, "the plugin's function runs");
    let id = site["id"].to_string();
    call(&mut c, Request::Disable { site: id.clone() });
    call(&mut c, Request::Enable { site: id.clone() });
    call(&mut c, Request::Revert { site: id.clone() });
    assert_eq!(gov_stats_target(5), 10);
    call(
        &mut c,
        Request::Unload {
            name: "gov-plugin".into(),
        },
    );

    let stats = call(&mut c, Request::Stats);
    // JSON.
    let plugin = stats["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .find(|p| p["path"] == so_s.as_str())
        .unwrap_or_else(|| panic!("no figures for {so_s}: {stats}"));
    assert_eq!(plugin["name"], "gov-plugin");
    assert_eq!(plugin["loads"], 1);
    assert_eq!(plugin["failures"]["E_PLG_ALREADY_LOADED"], 1);
    assert_eq!(plugin["success_rate"], 0.5);
    assert_eq!(plugin["state"], "unloaded");
    assert!(
        plugin["load_seconds_p50"].as_f64().expect("p50") > 0.0,
        "{plugin}"
    );
    assert!(
        plugin["load_seconds_p99"].as_f64().expect("p99")
            >= plugin["load_seconds_p50"].as_f64().expect("p50")
    );
    let site_fig = stats["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .find(|s| s["name"] == "gov_stats_target")
        .unwrap_or_else(|| panic!("no site figures: {stats}"));
    for (k, v) in [
        ("installs", 1),
        ("disables", 1),
        ("enables", 1),
        ("reverts", 1),
    ] {
        assert_eq!(site_fig[k], v, "{k}: {site_fig}");
    }
    assert_eq!(site_fig["state"], "reverted");

    // Prometheus, through a real parser.
    let text = stats["prometheus"].as_str().expect("prometheus text");
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let p = [("path", so_s.as_str())];
    assert_eq!(sample(&scrape, "hotpatch_plugin_loads_total", &p), 1.0);
    assert_eq!(
        sample(
            &scrape,
            "hotpatch_plugin_load_failures_total",
            &[("path", so_s.as_str()), ("code", "E_PLG_ALREADY_LOADED")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            "hotpatch_plugin_load_failures_total",
            &[("path", missing.as_str()), ("code", "E_PLG_NOT_FOUND")]
        ),
        1.0
    );
    assert_eq!(
        sample(&scrape, "hotpatch_plugin_load_success_ratio", &p),
        0.5
    );
    assert_eq!(
        sample(
            &scrape,
            "hotpatch_plugin_state",
            &[("path", so_s.as_str()), ("state", "unloaded")]
        ),
        1.0
    );
    let summary = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "hotpatch_plugin_load_seconds"
                && s.labels.get("path") == Some(so_s.as_str())
        })
        .expect("load-time summary");
    match &summary.value {
        PValue::Summary(qs) => {
            let q: HashMap<String, f64> = qs
                .iter()
                .map(|q| (q.quantile.to_string(), q.count))
                .collect();
            assert!(q.contains_key("0.5") && q.contains_key("0.99"), "{q:?}");
        }
        other => panic!("summary expected: {other:?}"),
    }
    let s = [("name", "gov_stats_target")];
    assert_eq!(sample(&scrape, "hotpatch_site_installs_total", &s), 1.0);
    assert_eq!(sample(&scrape, "hotpatch_site_reverts_total", &s), 1.0);
    assert_eq!(sample(&scrape, "hotpatch_site_disables_total", &s), 1.0);
    assert_eq!(sample(&scrape, "hotpatch_site_enables_total", &s), 1.0);
    assert!(sample(&scrape, "hotpatch_site_enabled_seconds_total", &s) > 0.0);
    assert_eq!(
        sample(
            &scrape,
            "hotpatch_site_state",
            &[("name", "gov_stats_target"), ("state", "reverted")]
        ),
        1.0
    );
    // Every family is announced once with HELP and TYPE.
    for fam in [
        "hotpatch_plugin_loads_total",
        "hotpatch_site_installs_total",
    ] {
        assert_eq!(text.matches(&format!("# TYPE {fam} ")).count(), 1, "{text}");
        assert!(scrape.docs.contains_key(fam), "{fam} has no HELP");
    }
    drop(c);
    drop(agent);
}
