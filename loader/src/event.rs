//! The load event: one `tracing` event per `load` call, success or not.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `tracing` target of loader events.
pub const TARGET: &str = "hotpatch_loader";

/// Emits the load event: wall-clock start, duration and outcome code
/// (`"OK"` or an error code).
pub(crate) fn load(
    path: &Path,
    plugin: Option<&str>,
    outcome: &str,
    started: SystemTime,
    took: Duration,
) {
    let unix_ms = started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let duration_us = took.as_micros() as u64;
    let path = path.display();
    let plugin = plugin.unwrap_or("");
    if outcome == "OK" {
        tracing::info!(target: TARGET, event = "plugin_load", %path, plugin, outcome, unix_ms, duration_us, "plugin loaded");
    } else {
        tracing::warn!(target: TARGET, event = "plugin_load", %path, plugin, outcome, unix_ms, duration_us, "plugin load failed");
    }
}

/// Emits the unload event.
pub(crate) fn unload(plugin: &str, outcome: &str, detail: &str, took: Duration) {
    let duration_us = took.as_micros() as u64;
    tracing::info!(target: TARGET, event = "plugin_unload", plugin, outcome, detail, duration_us, "plugin unloaded");
}
