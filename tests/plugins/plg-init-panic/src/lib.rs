//! Loader test fixture: `on_init` panics; the shim must catch it.

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

struct Panics;

impl Lifecycle for Panics {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        let v: Vec<u32> = Vec::new();
        panic!("plugin bug: index {} out of {}", 3, v.len())
    }
}

declare_plugin!(Panics, name = "plg-init-panic", version = "1.0.0");
