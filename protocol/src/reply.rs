//! The results of successful replies, one type per command, shared by the
//! agent (which builds them) and its clients (which read them): a field
//! renamed on one side is a compile error on the other.
//!
//! | request | result |
//! |---|---|
//! | `ping` | [`PingInfo`] |
//! | `status` | [`StatusInfo`] |
//! | `load` | [`PluginInfo`] |
//! | `unload` | [`UnloadInfo`] |
//! | `patch`, `swap`, `disable`, `enable`, `revert` | [`SiteInfo`] |
//! | `list` | [`ListInfo`] |
//! | `inspect` | [`InspectReport`] |
//! | `profile` | [`ProfileSummary`] (+ payloads) |
//! | `profile_raw` | [`RawProfileSummary`] (+ one payload) |
//! | `heap_start` | [`HeapStartInfo`] |
//! | `heap_stop` | [`HeapStopInfo`] |
//! | `heap_snapshot` | [`HeapSnapshotInfo`] (+ one payload) |
//! | `leak_check` | [`LeakCheckInfo`] |
//! | `watch_apply`, `watch_revert` | [`WatchApplyInfo`] |
//! | `watch_status` | [`WatchStatusInfo`] |
//!
//! Fields that a result has only sometimes are `Option`s left out of the
//! JSON when `None`; fields that are always there but may be empty are
//! `Option`s written as `null`.

use serde::{Deserialize, Serialize};

use crate::PayloadHeader;

/// `ping`: liveness and identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingInfo {
    /// The host's pid.
    pub pid: u32,
    /// The host's executable (empty when unknown).
    pub exe: String,
    /// The agent crate's version.
    pub agent_version: String,
    /// Seconds since the agent started.
    pub uptime_s: f64,
}

/// `status`: the host's own status and counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// The host's pid.
    pub pid: u32,
    /// What the host's status callback returned (`null` without one).
    pub host: serde_json::Value,
    /// Plugins loaded through the agent.
    pub plugins: usize,
    /// Live patch sites.
    pub sites: usize,
    /// Whether a CPU profile is sampling now.
    pub profiling: bool,
}

/// A plugin loaded through the agent (`load`, `list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// Its descriptor name.
    pub name: String,
    /// Its descriptor version.
    pub version: String,
    /// The file it was loaded from.
    pub path: String,
    /// Its load base, `0x…`.
    pub base: String,
    /// Its module id in the symbolizer's registry.
    pub module_id: Option<u64>,
    /// Whether it has a TLS segment.
    pub tls: bool,
    /// Pins on its module (patch sites using it, and others').
    pub pins: u64,
}

/// What `unload` did with the plugin's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnloadOutcome {
    /// `dlclose` unmapped it.
    Unmapped,
    /// It stays mapped (see the reason).
    Retained,
}

impl std::fmt::Display for UnloadOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UnloadOutcome::Unmapped => "unmapped",
            UnloadOutcome::Retained => "retained",
        })
    }
}

/// `unload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnloadInfo {
    /// The plugin's name.
    pub name: String,
    /// Whether it was unmapped.
    pub outcome: UnloadOutcome,
    /// Why it stays mapped, when it does.
    pub reason: Option<String>,
    /// The error its `on_shutdown` returned, if any.
    pub shutdown_error: Option<String>,
    /// What `dlclose` reported, if it failed.
    pub dlclose_error: Option<String>,
}

/// A patch site's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteState {
    /// Calls run the replacement.
    Enabled,
    /// Calls run the original; the entry jump stays.
    Disabled,
    /// Removed (the reply to `revert`).
    Reverted,
}

impl std::fmt::Display for SiteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SiteState::Enabled => "enabled",
            SiteState::Disabled => "disabled",
            SiteState::Reverted => "reverted",
        })
    }
}

/// What the agent found comparing the DWARF signatures of a target and
/// its replacement (`patch`, `swap`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureCheck {
    /// Whether both were described, so the check ran.
    pub checked: bool,
    /// Why it did not run (when `checked` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The mismatches `force` went over (when `checked`; empty when the two
    /// are called the same way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_over: Option<Vec<String>>,
}

impl SignatureCheck {
    /// The check did not run, because of `why`.
    pub fn not_checked(why: impl Into<String>) -> Self {
        SignatureCheck {
            checked: false,
            why: Some(why.into()),
            forced_over: None,
        }
    }

    /// The check ran; `forced_over` lists the mismatches forced over.
    pub fn checked(forced_over: Vec<String>) -> Self {
        SignatureCheck {
            checked: true,
            why: None,
            forced_over: Some(forced_over),
        }
    }
}

/// A patch site (`patch`, `swap`, `disable`, `enable`, `revert`, `list`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    /// Its id (`#ID`).
    pub id: u32,
    /// Its name (the target's symbol).
    pub name: String,
    /// `MODULE:SYMBOL` of the patched function.
    pub target: String,
    /// Its address, `0x…`.
    pub target_addr: String,
    /// Its size in bytes (0: unknown).
    pub target_size: u64,
    /// `PLUGIN:SYMBOL` of the replacement.
    pub with: String,
    /// Its address, `0x…`.
    pub with_addr: String,
    /// Enabled, disabled or reverted.
    pub state: SiteState,
    /// The trampoline that runs the original, `0x…`.
    pub trampoline: String,
    /// `patch` and `swap`: the signature check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureCheck>,
    /// `swap`: the replacement before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// A site started as a canary: its state and figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryInfo>,
}

/// Where a canary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryState {
    /// `ratio` of the calls go to the replacement.
    Canary,
    /// Every call goes to the replacement (the window passed clean).
    Promoted,
    /// Every call goes to the current code again; `reason` says why.
    RolledBack,
}

impl std::fmt::Display for CanaryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CanaryState::Canary => "canary",
            CanaryState::Promoted => "promoted",
            CanaryState::RolledBack => "rolled_back",
        })
    }
}

/// The `stats` reply: health figures per plugin and per patch site, and
/// the same figures in the Prometheus text exposition format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// One row per plugin file given to `load`.
    pub plugins: Vec<PluginStats>,
    /// One row per patched target (`MODULE:SYMBOL`).
    pub sites: Vec<SiteStats>,
    /// Everything above as Prometheus text (`stats --prometheus`).
    pub prometheus: String,
}

/// A plugin's load figures (in [`StatsReport`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginStats {
    /// The path given to `load`.
    pub path: String,
    /// The plugin's name from its descriptor (else the file name).
    pub name: String,
    /// `loaded`, `unloaded` or `failed`.
    pub state: String,
    /// Successful loads.
    pub loads: u64,
    /// Failed loads by error code.
    pub failures: std::collections::BTreeMap<String, u64>,
    /// Unloads.
    pub unloads: u64,
    /// Loads plus failures.
    pub attempts: u64,
    /// Loads / attempts, when there was an attempt.
    pub success_rate: Option<f64>,
    /// Median load time (seconds) of the recent attempts.
    pub load_seconds_p50: Option<f64>,
    /// 99th percentile load time (seconds) of the recent attempts.
    pub load_seconds_p99: Option<f64>,
}

/// A patch site's figures (in [`StatsReport`]); a target patched,
/// reverted and patched again is one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteStats {
    /// The latest site id at this target.
    pub id: u64,
    /// The site's name.
    pub name: String,
    /// `MODULE:SYMBOL`.
    pub target: String,
    /// The current replacement, `PLUGIN:SYMBOL`.
    pub with: String,
    /// `enabled`, `disabled` or `reverted`.
    pub state: String,
    /// Installs.
    pub installs: u64,
    /// Swaps of the replacement.
    pub swaps: u64,
    /// Enables after a disable.
    pub enables: u64,
    /// Disables.
    pub disables: u64,
    /// Reverts.
    pub reverts: u64,
    /// Seconds the site was enabled, in total.
    pub enabled_seconds: f64,
    /// The site's canary, if it started as one (kept after a revert).
    pub canary: Option<CanaryInfo>,
}

/// A canary site's state and figures (in [`SiteInfo`] and `stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryInfo {
    /// `M/N`.
    pub ratio: String,
    /// Canary, promoted or rolled back.
    pub state: CanaryState,
    /// Why it was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the canary started.
    pub since_s: f64,
    /// Seconds of clean window before promotion.
    pub promote_after_s: f64,
    /// The rollback rules (`panic`, `errors>5%`).
    pub rollback_on: Vec<String>,
    /// Calls through the dispatcher (modulo 2^32).
    pub dispatched: u64,
    /// Calls of the replacement (its counters; 0 without them).
    pub calls: u64,
    /// Panics caught in the replacement.
    pub panics: u64,
    /// Errors of the replacement (its classifier).
    pub errors: u64,
    /// Calls of the current code through the control wrapper.
    pub control_calls: u64,
    /// Errors of the current code (the same classifier).
    pub control_errors: u64,
}

/// `list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListInfo {
    /// Plugins loaded through the agent.
    pub plugins: Vec<PluginInfo>,
    /// Live patch sites.
    pub sites: Vec<SiteInfo>,
}

/// `inspect` (and `hotpatch inspect FILE SYMBOL` offline): the patcher's
/// preflight report for a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectReport {
    /// What was inspected (`MODULE:SYMBOL`, `FILE:SYMBOL` offline).
    pub target: String,
    /// Its signature from DWARF, if DWARF describes it.
    pub signature: Option<String>,
    /// Its address, `0x…` (a file virtual address offline).
    pub addr: String,
    /// Its size in bytes (0: unknown).
    pub size: u64,
    /// Whether a patch would be installed.
    pub patchable: bool,
    /// The refusal's code when not patchable.
    pub code: Option<String>,
    /// The refusal's message when not patchable.
    pub message: Option<String>,
    /// The report, for humans (several lines).
    pub report: String,
    /// Offline: the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Offline: whether the symbol is local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<bool>,
    /// Offline: what is wrong with the debug info, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
}

/// `profile_raw`: what was captured; the capture itself is the payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawProfileSummary {
    /// Samples taken.
    pub samples: u64,
    /// Sampling frequency (Hz).
    pub frequency: i32,
    /// Seconds sampled.
    pub duration_s: f64,
    /// Module-map epochs in the capture.
    pub epochs: usize,
    /// Modules in the capture.
    pub modules: usize,
    /// What went wrong while sampling.
    pub errors: Vec<String>,
    /// One [`crate::RAW_PROFILE_PAYLOAD`].
    pub payloads: Vec<PayloadHeader>,
}

/// `profile` (resolved in the host), and what `hotpatch profile` reports
/// after resolving a [`RawProfileSummary`]'s capture itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileSummary {
    /// Samples taken.
    pub samples: u64,
    /// Sampling frequency (Hz).
    pub frequency: i32,
    /// Seconds sampled.
    pub duration_s: f64,
    /// Distinct stacks.
    pub stacks: usize,
    /// Distinct locations.
    pub locations: usize,
    /// Locations no symbol names.
    pub unnamed_locations: usize,
    /// Module-map epochs.
    pub epochs: usize,
    /// What went wrong while sampling or resolving.
    pub errors: Vec<String>,
    /// The top-N table, for humans.
    pub top: String,
    /// `profile`: the payloads (`profile.pb.gz`, `flamegraph.svg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payloads: Option<Vec<PayloadHeader>>,
    /// Resolved by the client: modules in the capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<usize>,
    /// Resolved by the client: seconds spent resolving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve_s: Option<f64>,
    /// Resolved by the client: warnings about debug info.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
}

/// `heap_start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapStartInfo {
    /// Mean bytes between samples.
    pub rate: u64,
    /// The allocator whose entry points were patched.
    pub allocator: String,
}

/// The heap sampler's counters (the heap crate's `HeapStats`; only what
/// clients read is typed, the rest passes through).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeapStats {
    /// Samples taken.
    pub samples: u64,
    /// The other counters.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `heap_stop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeapStopInfo {
    /// Always true.
    pub stopped: bool,
    /// The sampler's counters at the stop.
    pub stats: HeapStats,
}

/// `heap_snapshot`: totals; the pprof profile is the payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeapSnapshotInfo {
    /// Mean bytes between samples.
    pub rate: u64,
    /// Objects allocated (estimate).
    pub alloc_objects: i64,
    /// Bytes allocated (estimate).
    pub alloc_space: i64,
    /// Objects in use (estimate).
    pub inuse_objects: i64,
    /// Bytes in use (estimate).
    pub inuse_space: i64,
    /// Standard deviation of `inuse_space` from sampling alone (bytes):
    /// the estimate is within ±2 of these of the truth ~95% of the time.
    /// Absent from agents older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inuse_space_sd: Option<f64>,
    /// Distinct stacks.
    pub stacks: usize,
    /// The sampler's counters.
    pub stats: HeapStats,
    /// One `heap.pb.gz`.
    pub payloads: Vec<PayloadHeader>,
}

/// `leak_check`: the heap crate's leak report, with its verdict and table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeakCheckInfo {
    /// Whether the plugin left memory in use beyond the sampling noise.
    pub leaks: bool,
    /// The report, for humans.
    pub table: String,
    /// The report's fields (the heap crate's `LeakReport`).
    #[serde(flatten)]
    pub report: serde_json::Map<String, serde_json::Value>,
}

// ---- `hotpatch watch` (issue #13) ----

/// `watch_apply` and `watch_revert`: what the step did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchApplyInfo {
    /// The generation now live (0: the original code everywhere).
    pub generation: u64,
    /// Whether this step changed anything in the process (false: the
    /// build is what already runs, and no generation number was taken).
    #[serde(default)]
    pub applied: bool,
    /// Functions whose calls now go to the new generation.
    pub patched: Vec<String>,
    /// New functions placed with it.
    pub added: Vec<String>,
    /// Sites installed by this step.
    pub installed: usize,
    /// Sites swapped from the previous generation.
    pub swapped: usize,
    /// Functions put back to the original code by this step.
    pub reverted: Vec<String>,
    /// Generations unmapped by this step.
    pub unloaded: Vec<u64>,
    /// Older generations still mapped (a thread may still run in them).
    pub retained: Vec<u64>,
    /// Bytes mapped for this generation.
    pub bytes: usize,
    /// Time spent in the target, microseconds.
    pub micros: u64,
    /// The generation's debug module (DWARF and symbols at the code's
    /// runtime addresses), `null` when none was written.
    pub debug_file: Option<String>,
}

/// `watch_status`: the live generation, its sites, what is still mapped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchStatusInfo {
    /// The live generation (0: none).
    pub generation: u64,
    /// The sites of `hotpatch watch`.
    pub sites: Vec<WatchSiteInfo>,
    /// Generations still mapped.
    pub mapped: Vec<WatchMappedInfo>,
    /// Generations unmapped by this request.
    pub unloaded: Vec<u64>,
}

/// One site of `hotpatch watch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchSiteInfo {
    /// The function's name.
    pub function: String,
    /// The generation it leads to.
    pub generation: u64,
    /// Whether calls go to the new code.
    pub enabled: bool,
}

/// A generation still mapped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchMappedInfo {
    /// Its number.
    pub generation: u64,
    /// Where its code starts.
    pub base: u64,
    /// Bytes of code.
    pub len: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// The wire names are what clients of older builds read: a renamed
    /// field must show up here, not only as a compile error on both sides.
    #[test]
    fn site_info_wire_format_is_stable() {
        let mut site = SiteInfo {
            id: 3,
            name: "demo_price".into(),
            target: "demo-target:demo_price".into(),
            target_addr: "0x1000".into(),
            target_size: 64,
            with: "pricing-v1:quote".into(),
            with_addr: "0x2000".into(),
            state: SiteState::Enabled,
            trampoline: "0x3000".into(),
            signature: None,
            previous: None,
            canary: None,
        };
        assert_eq!(
            serde_json::to_value(&site).unwrap(),
            serde_json::json!({
                "id": 3, "name": "demo_price", "target": "demo-target:demo_price",
                "target_addr": "0x1000", "target_size": 64, "with": "pricing-v1:quote",
                "with_addr": "0x2000", "state": "enabled", "trampoline": "0x3000",
            })
        );
        site.signature = Some(SignatureCheck::not_checked("no DWARF"));
        site.previous = Some("pricing-v2:quote".into());
        site.state = SiteState::Reverted;
        let v = serde_json::to_value(&site).unwrap();
        assert_eq!(
            v["signature"],
            serde_json::json!({"checked": false, "why": "no DWARF"})
        );
        assert_eq!(v["previous"], "pricing-v2:quote");
        assert_eq!(v["state"], "reverted");
        let back: SiteInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, site);
        assert_eq!(
            serde_json::to_value(SignatureCheck::checked(vec![])).unwrap(),
            serde_json::json!({"checked": true, "forced_over": []})
        );
    }

    #[test]
    fn a_result_of_the_wrong_shape_is_refused() {
        // A `list` result read as a site (a client asking the wrong type, or
        // an agent answering another command) fails to decode.
        let list = ListInfo {
            plugins: vec![],
            sites: vec![],
        };
        let v = serde_json::to_value(&list).unwrap();
        assert!(serde_json::from_value::<SiteInfo>(v).is_err());
    }

    #[test]
    fn leak_check_keeps_the_report_fields() {
        let v = serde_json::json!({"leaks": false, "table": "t\n", "cycles": 3, "rate": 16});
        let l: LeakCheckInfo = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(l.report.get("cycles"), Some(&serde_json::json!(3)));
        assert_eq!(serde_json::to_value(&l).unwrap(), v);
    }
}
