//! Governance test fixture: a plugin with requirements (host API range,
//! shared crate) whose ELF constructor leaves a marker file, so a test can
//! prove that a refused plugin never ran any code.

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

include!("ctor.rs");

struct Gov;

impl Lifecycle for Gov {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        Ok(())
    }
}

declare_plugin!(
    Gov,
    name = "gov-plugin",
    version = "1.0.0",
    host = ">=1.0, <2",
    shared = env!("HOTPATCH_SHARED"),
);

/// Uses the shared type, so the dependency is real.
#[unsafe(no_mangle)]
pub extern "C" fn gov_plugin_shared_a(x: u64) -> u64 {
    gov_shared::Shared { a: x }.a + 1
}
