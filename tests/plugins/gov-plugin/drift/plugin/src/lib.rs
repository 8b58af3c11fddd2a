//! Governance test fixture: a plugin built against another version of a
//! shared crate than its host. Refused with `E_PLG_DEP_DRIFT` before
//! `dlopen`; its constructor would leave a marker if it ever ran.

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

include!("../../../src/ctor.rs");

struct Drift;

impl Lifecycle for Drift {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        Ok(())
    }
}

declare_plugin!(
    Drift,
    name = "gov-plugin-drift",
    version = "1.0.0",
    host = ">=1.0, <2",
    shared = env!("HOTPATCH_SHARED"),
);

/// Uses the shared type, so the dependency is real.
#[unsafe(no_mangle)]
pub extern "C" fn gov_plugin_drift_shared(x: u64) -> u64 {
    let s = gov_shared::Shared { a: x, b: 1 };
    s.a + s.b
}
