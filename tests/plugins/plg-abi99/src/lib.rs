//! Loader test fixture: a descriptor with ABI major 99, as a plugin built
//! against a future, incompatible plugin API would carry.

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

struct Future;

impl Lifecycle for Future {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        unreachable!("the host must refuse this plugin before running it")
    }
}

declare_plugin!(@abi_major = 99; Future, name = "plg-abi99", version = "99.0.0");
