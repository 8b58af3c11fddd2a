//! Loader test fixture: `on_init` refuses to start.

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

struct Refuses;

impl Lifecycle for Refuses {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        Err(PluginError::new(
            "missing configuration: set PLG_INIT_FAIL_CONFIG",
        ))
    }
}

declare_plugin!(Refuses, name = "plg-init-fail", version = "1.0.0");
