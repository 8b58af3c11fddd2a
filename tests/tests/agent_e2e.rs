//! End to end, in processes: `demo-target serve` driven only through the
//! `hotpatch` binary — load, patch (the workers switch to v2 while they
//! run), swap back, disable, enable, revert, patch a local symbol, profile
//! (checked with `go tool pprof -raw`), unload — while the process stays
//! alive and its request counter never resets.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hotpatch_tests::agent_bins::{Foreign, Serve, text};
use serde_json::Value;

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "hotpatch failed:\n{}", text(&o));
    o
}

fn json(o: &Output) -> Value {
    let s = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(o)))
}

struct Watch {
    last_requests: u64,
}

impl Watch {
    /// `hotpatch status --json`, checking the counter never went back.
    fn status(&mut self, s: &Serve) -> Value {
        let v = json(&ok(s.run(&["status", "--json"])));
        let r = v["host"]["requests"].as_u64().expect("requests");
        assert!(
            r >= self.last_requests,
            "the request counter went back: {} -> {r}",
            self.last_requests
        );
        self.last_requests = r;
        v
    }

    /// Waits until every worker reports `key == want` on a request served
    /// after this call.
    fn wait_all(&mut self, s: &Serve, key: &str, want: &Value) {
        let before: Vec<u64> = self.status(s)["host"]["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["served"].as_u64().unwrap_or(0))
            .collect();
        let t0 = Instant::now();
        loop {
            let v = self.status(s);
            let ws = v["host"]["workers"].as_array().expect("workers").clone();
            if ws
                .iter()
                .zip(&before)
                .all(|(w, b)| w["served"].as_u64().unwrap_or(0) > *b && &w[key] == want)
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "workers did not reach {key} = {want} in 20 s: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn fails_with(o: &Output, code: &str) {
    assert!(!o.status.success(), "expected {code}:\n{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(code),
        "expected {code} on stderr:\n{}",
        text(o)
    );
}

#[test]
fn serve_driven_by_the_cli() {
    // Two other agents of the same user, where the user's own would be:
    // with this environment, and in the `/tmp` fallback. The test's agent
    // and CLI must not see them (no E_AGENT_AMBIGUOUS, no wrong process).
    let mut foreign = [Foreign::start(false), Foreign::start(true)];
    let mut s = Serve::start();
    let mut w = Watch { last_requests: 0 };
    let v1 = s.bins.plugin("pricing-v1");
    let v2 = s.bins.plugin("pricing-v2");
    let fix = s.bins.plugin("pricing-fix");

    // ps finds it (same runtime dir).
    let ps = ok(s.cli().args(["ps", "--json"]).output().expect("ps"));
    let ps_text = String::from_utf8_lossy(&ps.stdout);
    assert!(
        ps_text.contains(&format!("\"pid\":{}", s.pid())) && ps_text.contains("\"ready\""),
        "{ps_text}"
    );
    // Without --pid, the only agent in this runtime dir is chosen.
    ok(s.cli().args(["status"]).output().expect("status"));
    w.wait_all(&s, "engine", &"builtin".into());

    // inspect, live and offline: the preflight verdict and the DWARF
    // signature of the target.
    let live = json(&ok(s.run(&["inspect", "demo_price", "--json"])));
    assert_eq!(live["patchable"], true, "{live}");
    assert_eq!(live["signature"], "fn demo_price(u64) -> u64", "{live}");
    let off = ok(s
        .cli()
        .args([
            "inspect",
            s.bins.demo.to_str().expect("utf-8"),
            "demo_price",
        ])
        .output()
        .expect("offline inspect"));
    let off = String::from_utf8_lossy(&off.stdout);
    assert!(
        off.contains("signature (DWARF): fn demo_price(u64) -> u64"),
        "{off}"
    );

    for p in [&v1, &v2, &fix] {
        let o = ok(s.run(&["load", p.to_str().expect("utf-8 path"), "--json"]));
        assert_eq!(json(&o)["tls"], true, "{}", text(&o));
    }

    let o = ok(s.run(&[
        "patch",
        "demo_price",
        "--with",
        "pricing-v1:pricing_v1_quote",
        "--json",
    ]));
    assert_eq!(json(&o)["state"], "enabled");
    // Both sides have DWARF (fixture profile): the signatures were compared.
    assert_eq!(json(&o)["signature"]["checked"], true, "{}", text(&o));
    w.wait_all(&s, "engine", &"v1".into());

    // Profile while v1 runs.
    let dir = s.runtime_dir.join("out");
    std::fs::create_dir_all(&dir).expect("out dir");
    let pb = dir.join("profile.pb.gz");
    let svg = dir.join("flamegraph.svg");
    let o = ok(s.run(&[
        "profile",
        "--seconds",
        "2",
        "--hz",
        "250",
        // Functions with no self samples sort by name below the hot ones:
        // ask for every line, so the plugin's are in.
        "--top",
        "1000",
        "-o",
        pb.to_str().expect("utf-8"),
        "--flamegraph",
        svg.to_str().expect("utf-8"),
        "--json",
    ]));
    let p = json(&o);
    assert!(p["samples"].as_u64().unwrap_or(0) > 0, "{p}");
    assert!(
        p["top"].as_str().unwrap_or("").contains("pricing_v1"),
        "{p}"
    );
    assert!(std::fs::metadata(&pb).expect("profile written").len() > 0);
    let svg_text = std::fs::read_to_string(&svg).expect("flamegraph written");
    assert!(svg_text.contains("<svg"), "not an SVG");

    // A replacement called differently (no parameter instead of one) is
    // refused with every difference named; the site keeps running v1.
    let o = s.run(&[
        "swap",
        "demo_price",
        "--with",
        "pricing-v2:pricing_v2_calls_on_this_thread",
    ]);
    fails_with(&o, "E_AGENT_SIGNATURE_MISMATCH");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("takes 1 parameter(s), the replacement 0"),
        "{}",
        text(&o)
    );
    let l = json(&ok(s.run(&["list", "--json"])));
    assert!(
        l["sites"][0]["with"]
            .as_str()
            .is_some_and(|w| w.contains("pricing_v1_quote")),
        "{l}"
    );
    w.wait_all(&s, "engine", &"v1".into());

    // Swap to v2 while the workers run, then back to v1.
    let o = ok(s.run(&[
        "swap",
        "demo_price",
        "--with",
        "pricing-v2:pricing_v2_quote",
    ]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("pricing-v2"),
        "{}",
        text(&o)
    );
    w.wait_all(&s, "engine", &"v2".into());
    ok(s.run(&[
        "swap",
        "demo_price",
        "--with",
        "pricing-v1:pricing_v1_quote",
    ]));
    w.wait_all(&s, "engine", &"v1".into());

    // A plugin a site jumps into cannot be unloaded.
    fails_with(&s.run(&["unload", "pricing-v1"]), "E_PLG_IN_USE");
    // A second site on the same target is refused.
    fails_with(
        &s.run(&[
            "patch",
            "demo_price",
            "--with",
            "pricing-v2:pricing_v2_quote",
        ]),
        "E_PATCH_ALREADY_PATCHED",
    );

    ok(s.run(&["disable", "demo_price"]));
    w.wait_all(&s, "engine", &"builtin".into());
    let l = json(&ok(s.run(&["list", "--json"])));
    assert_eq!(l["sites"][0]["state"], "disabled", "{l}");
    ok(s.run(&["enable", "demo_price"]));
    w.wait_all(&s, "engine", &"v1".into());

    // A local (non-exported) function of the binary, by its Rust path.
    ok(s.run(&[
        "patch",
        "demo_target::pricing::apply_tax",
        "--with",
        "pricing-fix:pricing_fix_apply_tax",
    ]));
    w.wait_all(&s, "tax_pct", &19.into());
    ok(s.run(&["revert", "demo_target::pricing::apply_tax"]));
    w.wait_all(&s, "tax_pct", &190.into());

    ok(s.run(&["revert", "#1"]));
    w.wait_all(&s, "engine", &"builtin".into());
    let l = json(&ok(s.run(&["list", "--json"])));
    assert_eq!(l["sites"].as_array().map(Vec::len), Some(0), "{l}");

    for name in ["pricing-v1", "pricing-v2", "pricing-fix"] {
        let o = ok(s.run(&["unload", name, "--json"]));
        assert_eq!(json(&o)["outcome"], "unmapped", "{}", text(&o));
    }
    let l = json(&ok(s.run(&["list", "--json"])));
    assert_eq!(l["plugins"].as_array().map(Vec::len), Some(0), "{l}");

    // The profile taken while v1 was loaded names its functions, read by
    // pprof itself.
    let raw = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(&pb)
        .env("HOME", &s.runtime_dir)
        .output()
        .expect("`go` is needed for this test: apt-get install -y golang-go");
    let raw_text = String::from_utf8_lossy(&raw.stdout);
    assert!(
        raw.status.success(),
        "go tool pprof -raw failed:\n{}",
        text(&raw)
    );
    // `pricing_v1_quote` calls `pricing_v1_hash`; which of the two holds
    // the samples depends on the optimizer, but one of them must be named.
    assert!(
        raw_text.contains("pricing_v1_quote") || raw_text.contains("pricing_v1_hash"),
        "no function of the plugin in the profile:\n{raw_text}"
    );
    assert!(
        raw_text.contains("libpricing_v1.so"),
        "no mapping for the plugin:\n{raw_text}"
    );

    // Still the same process, still serving.
    let before = w.last_requests;
    w.wait_all(&s, "engine", &"builtin".into());
    assert!(w.last_requests > before);
    assert!(s.alive(), "demo-target exited");
    for f in &mut foreign {
        assert!(f.alive(), "a foreign agent exited");
        assert!(f.socket.exists(), "{} is gone", f.socket.display());
    }
    let socket = s.socket.clone();
    assert!(s.terminate(), "demo-target did not exit on SIGTERM");
    assert!(!socket.exists(), "the socket was not removed at exit");
}
