//! Canary patches (issue #18, item 5): the dispatcher's split, exact when
//! single-threaded; a canary whose replacement panics on 1 input in 100
//! rolled back by the agent itself while worker threads call the function
//! (no caller sees a panic or a wrong value, the host keeps counting, the
//! reason in `list`, `stats --json`, `stats --prometheus` and the agent's
//! `tracing` event); a canary erring on 1 call in 4 rolled back by the
//! `errors>5%` rule with both rates in its reason; a clean
//! canary promoted, after which every call goes to the replacement; bad
//! ratios, bad rules, a replacement without counters and a second canary
//! refused with their codes. Timing never decides a verdict: the tests wait
//! for the agent's state changes with generous deadlines.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hotpatch_patcher::canary::{Canary, Ratio};
use hotpatch_patcher::{InstallOptions, Site};
use hotpatch_tests::agent_bins::{fresh_dir, isolate, text};
use hotpatch_tests::fixtures;
use prometheus_parse::{Scrape, Value as PValue};
use serde_json::Value;

/// How long a state change may take before the test fails (generous: the
/// machine may be loaded; this is a hang detector, not a measurement).
const DEADLINE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------
// The split, in this process.

#[inline(never)]
extern "C" fn split_current(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

#[inline(never)]
extern "C" fn split_canary(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(2)
}

/// Patched through a real site below. `imul` + `add`: room for the jump.
#[inline(never)]
extern "C" fn split_target(x: u64) -> u64 {
    x.wrapping_mul(0x2545_f491).wrapping_add(0x1234)
}

/// Calls `f` `k` times; returns how many results were the canary's
/// (`3x + 2`), checking every other result is `current(x)`.
fn count_canary(f: extern "C" fn(u64) -> u64, current: fn(u64) -> u64, k: u64) -> u64 {
    let mut hits = 0;
    for x in 0..k {
        let y = std::hint::black_box(f)(std::hint::black_box(x));
        if y == x.wrapping_mul(3).wrapping_add(2) {
            hits += 1;
        } else {
            assert_eq!(y, current(x), "call {x}: neither version's result");
        }
    }
    hits
}

#[test]
fn the_split_is_exact_single_threaded() {
    let k = 200_000u64;
    for (m, n) in [(1, 10), (3, 7), (1, 1000)] {
        let r = Ratio::new(m, n).expect("ratio");
        // SAFETY: both are `extern "C" fn(u64) -> u64` of this binary.
        let c = unsafe {
            Canary::new(
                split_current as *const () as usize,
                split_canary as *const () as usize,
                r,
            )
        }
        .expect("stub");
        // SAFETY: the stub forwards to one of two `extern "C" fn(u64) -> u64`.
        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(c.entry().as_usize()) };
        let start = c.counter();
        let hits = count_canary(f, |x| x.wrapping_mul(3).wrapping_add(1), k);
        // Exact: the Weyl sequence decides each call.
        assert_eq!(hits, r.canary_calls(start, k), "{r}");
        // And close to K*M/N: within 0.1% of K.
        let want = k * u64::from(m) / u64::from(n);
        assert!(hits.abs_diff(want) <= k / 1000, "{r}: {hits} vs {want}");
        assert_eq!(c.dispatched(), k as u32);
    }

    // Through a real site: installed disabled, the stub over its
    // trampoline, started with one store.
    let opts = InstallOptions::default();
    // SAFETY: `split_target` is a function of this binary, never read as
    // data; `split_canary` has its signature.
    let mut site = unsafe {
        Site::install_disabled(split_target as *const u8, split_canary as *const u8, &opts)
    }
    .expect("install");
    assert!(!site.is_enabled());
    let current = |x: u64| x.wrapping_mul(0x2545_f491).wrapping_add(0x1234);
    let f: extern "C" fn(u64) -> u64 = split_target;
    assert_eq!(
        count_canary(f, current, 1000),
        0,
        "disabled: the original runs"
    );
    let r = Ratio::new(1, 10).expect("ratio");
    // SAFETY: the trampoline runs `split_target`; same signature.
    let c = unsafe { Canary::new(site.original(), split_canary as *const () as usize, r) }
        .expect("stub");
    // SAFETY: the stub forwards to functions of `split_target`'s signature.
    unsafe { site.swap(c.entry()) }.expect("swap");
    site.enable().expect("enable");
    let start = c.counter();
    let hits = count_canary(f, current, k);
    assert_eq!(hits, r.canary_calls(start, k));
    // Promotion: one store, every call to the replacement.
    // SAFETY: as above.
    unsafe { site.swap(split_canary as *const u8) }.expect("promote");
    assert_eq!(count_canary(f, current, 1000), 1000);
    // Rollback: the original.
    site.disable().expect("rollback");
    assert_eq!(count_canary(f, current, 1000), 0);
    site.remove().expect("remove");
}

#[test]
fn bad_ratios_are_refused_by_the_patcher() {
    for bad in ["0/10", "11/10", "10/10", "garbage", "1/0", "", "1/-3"] {
        let e = Ratio::parse(bad).expect_err(bad);
        assert_eq!(e.code(), "E_PATCH_CANARY_RATIO", "{bad}: {e}");
    }
}

// ---------------------------------------------------------------------
// End to end: `canary-host serve` driven by the `hotpatch` binary.

struct Host {
    child: Child,
    runtime_dir: PathBuf,
    hotpatch: PathBuf,
    plugin: PathBuf,
    /// Where the host writes the agent's `tracing` events (a directory of
    /// the test's own).
    events_dir: PathBuf,
}

impl Host {
    fn start() -> Host {
        let dir = fixtures::build(&["hotpatch-cli", "canary-host", "canary-plugin"]);
        let runtime_dir = fresh_dir("canary", 0o700);
        let events_dir = fresh_dir("canary-events", 0o700);
        let mut cmd = Command::new(dir.join("canary-host"));
        cmd.env("CANARY_HOST_EVENTS", events_dir.join("events.log"));
        cmd.args(["serve", "3"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        isolate(&mut cmd, &runtime_dir);
        let mut child = cmd.spawn().expect("spawn canary-host");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read ready line");
        assert!(line.starts_with("ready "), "canary-host said {line:?}");
        Host {
            child,
            runtime_dir,
            hotpatch: dir.join("hotpatch"),
            plugin: dir.join("libcanary_plugin.so"),
            events_dir,
        }
    }

    /// Asserts that the agent emitted its rollback `tracing` event with
    /// `reason` (the host writes the events to a file, one per line).
    fn assert_rollback_event(&self, reason: &str) {
        let events =
            std::fs::read_to_string(self.events_dir.join("events.log")).unwrap_or_default();
        assert!(
            events
                .lines()
                .any(|l| l.starts_with("WARN hotpatch::canary")
                    && l.contains("canary rolled back")
                    && l.contains(reason)),
            "no rollback event with {reason:?} in:\n{events}"
        );
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(&self.hotpatch);
        isolate(&mut c, &self.runtime_dir);
        c.args(args)
            .args(["--pid", &self.child.id().to_string()])
            .output()
            .expect("run hotpatch")
    }

    fn ok(&self, args: &[&str]) -> Output {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "hotpatch {args:?} failed:\n{}",
            text(&o)
        );
        o
    }

    fn json(&self, args: &[&str]) -> Value {
        let o = self.ok(args);
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&o)))
    }

    fn fails_with(&self, args: &[&str], code: &str) {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "{args:?}: expected {code}:\n{}",
            text(&o)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(code),
            "{args:?}: expected {code} on stderr:\n{}",
            text(&o)
        );
    }

    fn load(&self) {
        let p = self.plugin.to_str().expect("utf-8").to_owned();
        self.ok(&["load", &p]);
    }

    /// The workers' figures: (calls, v1, v2, wrong) per worker.
    fn workers(&mut self) -> Vec<[u64; 4]> {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "canary-host died (a panic reached a caller?)"
        );
        let v = self.json(&["status", "--json"]);
        v["host"]["workers"]
            .as_array()
            .unwrap_or_else(|| panic!("no workers: {v}"))
            .iter()
            .map(|w| {
                let g = |k: &str| w[k].as_u64().unwrap_or_else(|| panic!("{k}: {w}"));
                [g("calls"), g("v1"), g("v2"), g("wrong")]
            })
            .collect()
    }

    /// Waits until every worker made at least `more` calls after `since`.
    fn wait_calls(&mut self, since: &[[u64; 4]], more: u64) -> Vec<[u64; 4]> {
        let t0 = Instant::now();
        loop {
            let now = self.workers();
            if now.iter().zip(since).all(|(n, b)| n[0] >= b[0] + more) {
                return now;
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "the workers stopped calling: {since:?} -> {now:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `patch canary_target --with canary-plugin:WITH --canary RATIO
    /// --promote-after AFTER [--rollback-on RULE] --json`; checks the ratio
    /// and the rollback rules the agent took (`rules`), then waits until the
    /// agent ends the canary and returns its last state from `list`.
    fn run_canary(
        &self,
        with: &str,
        ratio: &str,
        after: &str,
        rule: Option<&str>,
        rules: &[&str],
    ) -> Value {
        let with = format!("canary-plugin:{with}");
        let mut args = vec![
            "patch",
            "canary_target",
            "--with",
            &with,
            "--canary",
            ratio,
            "--promote-after",
            after,
        ];
        if let Some(r) = rule {
            args.extend(["--rollback-on", r]);
        }
        args.push("--json");
        let v = self.json(&args);
        assert_eq!(v["canary"]["ratio"], ratio, "{v}");
        assert_eq!(v["canary"]["rollback_on"], serde_json::json!(rules), "{v}");
        self.wait_canary_done()
    }

    /// The canary of the one site, from `list --json`, once its state is
    /// not `canary` any more.
    fn wait_canary_done(&self) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.json(&["list", "--json"]);
            let c = v["sites"][0]["canary"].clone();
            assert!(c.is_object(), "no canary in list: {v}");
            if c["state"] != "canary" {
                return c;
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "the agent neither promoted nor rolled back the canary: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Closing stdin ends `serve`; kill it if it does not.
        drop(self.child.stdin.take());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
        let _ = std::fs::remove_dir_all(&self.events_dir);
    }
}

fn no_wrong_values(w: &[[u64; 4]]) {
    for (i, x) in w.iter().enumerate() {
        assert_eq!(x[3], 0, "worker {i} saw wrong values: {w:?}");
    }
}

fn prom_value(scrape: &Scrape, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|x| x.metric == name && want.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            PValue::Counter(v) | PValue::Gauge(v) | PValue::Untyped(v) => v,
            ref o => panic!("{name}: {o:?}"),
        })
}

#[test]
fn a_panicking_canary_is_rolled_back_by_the_agent() {
    let mut h = Host::start();
    h.load();
    let before = h.wait_calls(&[[0; 4]; 3], 1);
    // A window far longer than the test: only a rollback ends it.
    let c = h.run_canary("canary_panicky", "1/10", "1h", Some("panic"), &["panic"]);
    assert_eq!(c["state"], "rolled_back", "{c}");
    let reason = c["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no reason: {c}"));
    assert!(reason.starts_with("panic:"), "{reason}");
    assert!(c["panics"].as_u64() >= Some(1), "{c}");
    assert!(c["calls"].as_u64() >= Some(1), "{c}");

    // The host kept counting, no caller saw a panic (it would have aborted
    // the process) or a wrong value, and nothing returned the clean
    // canary's value.
    let after = h.wait_calls(&before, 10_000);
    no_wrong_values(&after);
    assert!(after.iter().all(|w| w[2] == 0), "{after:?}");

    // Rolled back means the current code again: the replacement's call
    // count stops (a call already inside it may still finish: settle first).
    let settled = h.wait_calls(&after, 1);
    let calls = h.json(&["list", "--json"])["sites"][0]["canary"]["calls"].clone();
    h.wait_calls(&settled, 10_000);
    let later = h.json(&["list", "--json"]);
    assert_eq!(later["sites"][0]["canary"]["calls"], calls, "{later}");
    assert_eq!(later["sites"][0]["state"], "disabled", "{later}");

    // The reason in `list` (human), `stats --json` and the Prometheus text.
    let list = String::from_utf8_lossy(&h.ok(&["list"]).stdout).into_owned();
    assert!(
        list.contains("rolled_back") && list.contains(reason),
        "{list}"
    );
    let stats = h.json(&["stats", "--json"]);
    let site = stats["sites"]
        .as_array()
        .and_then(|s| {
            s.iter().find(|s| {
                s["target"]
                    .as_str()
                    .is_some_and(|t| t.ends_with(":canary_target"))
            })
        })
        .unwrap_or_else(|| panic!("no canary_target row: {stats}"));
    assert_eq!(site["canary"]["state"], "rolled_back", "{site}");
    assert_eq!(site["canary"]["reason"], reason, "{site}");
    let prom = String::from_utf8_lossy(&h.ok(&["stats", "--prometheus"]).stdout).into_owned();
    let scrape = Scrape::parse(prom.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    assert_eq!(
        prom_value(
            &scrape,
            "hotpatch_site_canary_state",
            &[("state", "rolled_back"), ("reason", reason)]
        ),
        Some(1.0),
        "{prom}"
    );
    assert!(
        prom_value(&scrape, "hotpatch_site_canary_panics_total", &[]) >= Some(1.0),
        "{prom}"
    );

    // The `tracing` event the agent emitted, with the same reason.
    h.assert_rollback_event(reason);

    h.ok(&["revert", "canary_target"]);
    let end = h.wait_calls(&after, 1000);
    no_wrong_values(&end);
}

/// `--rollback-on errors>P%`: a replacement whose `error_if` is true on 1
/// call in 4 (and returns the same value as the current code otherwise),
/// against current code that never errs, is rolled back with the two rates
/// in the reason; after the rollback no caller gets an error value again.
#[test]
fn an_erring_canary_is_rolled_back_on_its_error_rate() {
    let mut h = Host::start();
    h.load();
    let before = h.wait_calls(&[[0; 4]; 3], 1);
    no_wrong_values(&before);
    let c = h.run_canary(
        "canary_erring",
        "1/4",
        "1h",
        Some("errors>5%"),
        &["errors>5%"],
    );
    assert_eq!(c["state"], "rolled_back", "{c}");
    let reason = c["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no reason: {c}"))
        .to_owned();
    assert!(reason.starts_with("errors: "), "{reason}");
    assert!(reason.contains("(rule errors>5%)"), "{reason}");
    // The replacement erred on ~25% of its calls, the current code never:
    // the reason's two rates, read back as numbers.
    let rates: Vec<f64> = reason
        .split('%')
        .filter_map(|p| p.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(rates.len() >= 2, "two rates in {reason:?}");
    assert!(
        rates[0] > 5.0 && rates[0] <= 100.0,
        "replacement rate {rates:?}: {reason}"
    );
    assert_eq!(rates[1], 0.0, "current-code rate: {reason}");
    assert!(c["errors"].as_u64() >= Some(1), "{c}");
    assert_eq!(c["panics"].as_u64(), Some(0), "{c}");

    // While it ran, the canary's errors reached callers as its return
    // value (an error is a value, not a panic): the hosts counted them as
    // wrong. After the rollback the count stops (settle: a call already
    // inside the replacement may still return).
    let settled = h.wait_calls(&before, 1);
    let settled = h.wait_calls(&settled, 1);
    let later = h.wait_calls(&settled, 10_000);
    for (i, (a, b)) in settled.iter().zip(&later).enumerate() {
        assert_eq!(a[3], b[3], "worker {i}: an error value after rollback");
        assert!(b[1] >= a[1] + 10_000, "worker {i}: {a:?} -> {b:?}");
    }
    h.assert_rollback_event(&reason);
    h.ok(&["revert", "canary_target"]);
}

#[test]
fn a_clean_canary_is_promoted_then_takes_every_call() {
    let mut h = Host::start();
    h.load();
    // No rule given: the default (panic), as the replacement has counters.
    let c = h.run_canary("canary_clean", "1/10", "2s", None, &["panic"]);
    assert_eq!(c["state"], "promoted", "{c}");
    assert!(c["reason"].is_null(), "{c}");

    // Calls that were inside the stub at the promotion finish first.
    let now = h.wait_calls(&[[0; 4]; 3], 1);
    let settled = h.wait_calls(&now, 1);
    let later = h.wait_calls(&settled, 10_000);
    for (i, (a, b)) in settled.iter().zip(&later).enumerate() {
        assert_eq!(
            a[1], b[1],
            "worker {i}: the current code ran after promotion"
        );
        assert!(b[2] >= a[2] + 10_000, "worker {i}: {a:?} -> {b:?}");
    }
    no_wrong_values(&later);
    let list = h.json(&["list", "--json"]);
    assert_eq!(list["sites"][0]["state"], "enabled", "{list}");
    h.ok(&["revert", "canary_target"]);
}

#[test]
fn bad_canaries_are_refused_with_their_codes() {
    let h = Host::start();
    h.load();
    let patch = |extra: &[&str]| -> Vec<String> {
        ["patch", "canary_target", "--with"]
            .iter()
            .chain(extra)
            .map(|s| (*s).to_owned())
            .collect()
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    for ratio in ["0/10", "11/10", "10/10", "garbage"] {
        let a = patch(&["canary-plugin:canary_clean", "--canary", ratio]);
        h.fails_with(&args(&a), "E_PATCH_CANARY_RATIO");
    }
    let a = patch(&[
        "canary-plugin:canary_clean",
        "--canary",
        "1/10",
        "--rollback-on",
        "sometimes",
    ]);
    h.fails_with(&args(&a), "E_AGENT_CANARY_BAD_RULE");
    let a = patch(&[
        "canary-plugin:canary_plain",
        "--canary",
        "1/10",
        "--rollback-on",
        "panic",
    ]);
    h.fails_with(&args(&a), "E_AGENT_CANARY_NO_COUNTERS");
    // Nothing was left installed by the refusals.
    let list = h.json(&["list", "--json"]);
    assert_eq!(list["sites"], serde_json::json!([]), "{list}");

    let a = patch(&[
        "canary-plugin:canary_clean",
        "--canary",
        "1/10",
        "--promote-after",
        "1h",
    ]);
    h.ok(&args(&a));
    let a = patch(&["canary-plugin:canary_panicky", "--canary", "1/10"]);
    h.fails_with(&args(&a), "E_AGENT_CANARY_ACTIVE");
    h.ok(&["revert", "canary_target"]);
}
