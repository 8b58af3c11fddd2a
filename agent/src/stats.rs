//! Health figures (`stats`): per plugin, the loader's load figures
//! ([`hotpatch_loader::stats`]); per patch site, installs, swaps, reverts,
//! enables, disables and the time it was enabled, observed from the
//! replies of the requests that change sites. JSON, and the Prometheus text
//! exposition format so an existing monitoring stack scrapes it as is.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hotpatch_loader::stats::Exposition;
use serde::Deserialize;
use serde_json::Value;

use crate::protocol::{CanaryInfo, PluginStats, Request, SiteInfo, SiteStats, StatsReport};

/// Which site operation a request is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SiteOp {
    Install,
    Swap,
    Enable,
    Disable,
    Revert,
}

impl SiteOp {
    pub(crate) fn of(req: &Request) -> Option<Self> {
        Some(match req {
            Request::Patch { .. } => Self::Install,
            Request::Swap { .. } => Self::Swap,
            Request::Enable { .. } => Self::Enable,
            Request::Disable { .. } => Self::Disable,
            Request::Revert { .. } => Self::Revert,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
struct SiteFigures {
    /// The id of the latest site at this target.
    id: u64,
    name: String,
    target: String,
    with: String,
    installs: u64,
    swaps: u64,
    enables: u64,
    disables: u64,
    reverts: u64,
    enabled_since: Option<Instant>,
    enabled_before: Duration,
    state: &'static str,
    /// The latest canary state of a site started as a canary.
    canary: Option<CanaryInfo>,
}

impl SiteFigures {
    fn enabled_for(&self, now: Instant) -> Duration {
        self.enabled_before + self.enabled_since.map_or(Duration::ZERO, |t| now - t)
    }
}

/// By target (`MODULE:SYMBOL`): a target patched, reverted and patched
/// again is one row with two installs.
static SITES: Mutex<BTreeMap<String, SiteFigures>> = Mutex::new(BTreeMap::new());

fn sites() -> std::sync::MutexGuard<'static, BTreeMap<String, SiteFigures>> {
    SITES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a successful site operation from its reply (which carries the
/// site's `id`, `name`, `target` and `with`).
pub(crate) fn observe(op: Option<SiteOp>, reply: &Value) {
    let Some(op) = op else { return };
    // Every site operation replies with a `SiteInfo`; anything else is not
    // a site's reply and is not counted.
    let Ok(site) = SiteInfo::deserialize(reply) else {
        return;
    };
    let id = u64::from(site.id);
    let now = Instant::now();
    let mut map = sites();
    let f = map
        .entry(site.target.clone())
        .or_insert_with(|| SiteFigures {
            id,
            name: site.name.clone(),
            target: site.target.clone(),
            with: site.with.clone(),
            installs: 0,
            swaps: 0,
            enables: 0,
            disables: 0,
            reverts: 0,
            enabled_since: None,
            enabled_before: Duration::ZERO,
            state: "enabled",
            canary: None,
        });
    let stop = |f: &mut SiteFigures| {
        if let Some(t) = f.enabled_since.take() {
            f.enabled_before += now - t;
        }
    };
    f.id = id;
    match op {
        SiteOp::Install => {
            f.canary = site.canary.clone();
            f.installs += 1;
            f.enabled_since = Some(now);
            f.state = "enabled";
        }
        SiteOp::Swap => {
            f.swaps += 1;
            f.with = site.with.clone();
        }
        SiteOp::Enable => {
            f.enables += 1;
            if f.enabled_since.is_none() {
                f.enabled_since = Some(now);
            }
            f.state = "enabled";
        }
        SiteOp::Disable => {
            f.disables += 1;
            stop(f);
            f.state = "disabled";
        }
        SiteOp::Revert => {
            f.reverts += 1;
            stop(f);
            f.state = "reverted";
        }
    }
}

/// Records the latest state of the canary of the site at `target`
/// (`MODULE:SYMBOL`), kept after the site is reverted.
pub(crate) fn record_canary(target: &str, info: CanaryInfo) {
    if let Some(f) = sites().get_mut(target) {
        f.canary = Some(info);
    }
}

/// The `stats` reply: `plugins` and `sites`, and the same figures as
/// Prometheus text in `prometheus`.
pub(crate) fn reply() -> StatsReport {
    let plugins = hotpatch_loader::stats::snapshot()
        .into_iter()
        .map(|p| PluginStats {
            attempts: p.attempts(),
            success_rate: p.success_rate(),
            load_seconds_p50: p.load_time_quantile(0.5),
            load_seconds_p99: p.load_time_quantile(0.99),
            state: p.state.as_str().to_owned(),
            failures: p
                .failures
                .iter()
                .map(|(code, n)| ((*code).to_owned(), *n))
                .collect(),
            loads: p.loads,
            unloads: p.unloads,
            path: p.path,
            name: p.name,
        })
        .collect();
    let now = Instant::now();
    let map = sites().clone();
    let sites = map
        .values()
        .map(|f| SiteStats {
            id: f.id,
            name: f.name.clone(),
            target: f.target.clone(),
            with: f.with.clone(),
            state: f.state.to_owned(),
            installs: f.installs,
            swaps: f.swaps,
            enables: f.enables,
            disables: f.disables,
            reverts: f.reverts,
            enabled_seconds: f.enabled_for(now).as_secs_f64(),
            canary: f.canary.clone(),
        })
        .collect();
    StatsReport {
        plugins,
        sites,
        prometheus: prometheus(&map, now),
    }
}

fn prometheus(map: &BTreeMap<String, SiteFigures>, now: Instant) -> String {
    let mut e = Exposition::new();
    hotpatch_loader::stats::write_prometheus(&mut e);
    let ids: Vec<(String, &SiteFigures)> = map.values().map(|f| (f.id.to_string(), f)).collect();
    type Counter = (&'static str, &'static str, fn(&SiteFigures) -> u64);
    let counters: [Counter; 5] = [
        (
            "hotpatch_site_installs_total",
            "Patch sites installed.",
            |f| f.installs,
        ),
        (
            "hotpatch_site_swaps_total",
            "Replacements swapped on a live site.",
            |f| f.swaps,
        ),
        ("hotpatch_site_enables_total", "Sites enabled again.", |f| {
            f.enables
        }),
        ("hotpatch_site_disables_total", "Sites disabled.", |f| {
            f.disables
        }),
        (
            "hotpatch_site_reverts_total",
            "Sites reverted (original bytes restored).",
            |f| f.reverts,
        ),
    ];
    for (name, help, get) in counters {
        e.family(name, "counter", help);
        for (id, f) in &ids {
            e.sample(
                name,
                &[("site", id), ("name", &f.name), ("target", &f.target)],
                get(f) as f64,
            );
        }
    }
    e.family(
        "hotpatch_site_enabled_seconds_total",
        "counter",
        "Time the site's replacement was live.",
    );
    for (id, f) in &ids {
        e.sample(
            "hotpatch_site_enabled_seconds_total",
            &[("site", id), ("name", &f.name), ("target", &f.target)],
            f.enabled_for(now).as_secs_f64(),
        );
    }
    e.family(
        "hotpatch_site_state",
        "gauge",
        "1 for the site's current state (enabled, disabled, reverted).",
    );
    for (id, f) in &ids {
        e.sample(
            "hotpatch_site_state",
            &[
                ("site", id),
                ("name", &f.name),
                ("state", f.state),
                ("with", &f.with),
            ],
            1.0,
        );
    }
    canary_prometheus(&mut e, &ids);
    e.finish()
}

fn canary_prometheus(e: &mut Exposition, ids: &[(String, &SiteFigures)]) {
    let canaries: Vec<(&String, &SiteFigures, &CanaryInfo)> = ids
        .iter()
        .filter_map(|(id, f)| f.canary.as_ref().map(|c| (id, *f, c)))
        .collect();
    type Counter = (&'static str, &'static str, fn(&CanaryInfo) -> u64);
    let counters: [Counter; 5] = [
        (
            "hotpatch_site_canary_calls_total",
            "Calls of a canary's replacement (its own counters).",
            |c| c.calls,
        ),
        (
            "hotpatch_site_canary_panics_total",
            "Panics caught in a canary's replacement.",
            |c| c.panics,
        ),
        (
            "hotpatch_site_canary_errors_total",
            "Results of a canary's replacement classified as errors.",
            |c| c.errors,
        ),
        (
            "hotpatch_site_canary_control_calls_total",
            "Calls of the current code measured during a canary.",
            |c| c.control_calls,
        ),
        (
            "hotpatch_site_canary_control_errors_total",
            "Results of the current code classified as errors during a canary.",
            |c| c.control_errors,
        ),
    ];
    for (name, help, get) in counters {
        e.family(name, "counter", help);
        for (id, f, c) in &canaries {
            e.sample(
                name,
                &[("site", id), ("name", &f.name), ("target", &f.target)],
                get(c) as f64,
            );
        }
    }
    e.family(
        "hotpatch_site_canary_state",
        "gauge",
        "1 for a canary site's state (canary, promoted, rolled_back) and the rollback reason.",
    );
    for (id, f, c) in &canaries {
        let state = c.state.to_string();
        e.sample(
            "hotpatch_site_canary_state",
            &[
                ("site", id),
                ("name", &f.name),
                ("ratio", &c.ratio),
                ("state", &state),
                ("reason", c.reason.as_deref().unwrap_or("")),
            ],
            1.0,
        );
    }
}
