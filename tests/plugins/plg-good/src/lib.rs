//! Loader test fixture: a well-formed plugin. It uses no thread-local with a
//! destructor, so glibc does not mark it NODELETE and `dlclose` unmaps it.

use std::sync::atomic::{AtomicU32, Ordering};

use hotpatch_plugin_api::{HostApi, Lifecycle, LogLevel, PluginError, declare_plugin};

static INITS: AtomicU32 = AtomicU32::new(0);

struct Good;

impl Lifecycle for Good {
    fn on_init(host: &HostApi) -> Result<(), PluginError> {
        INITS.fetch_add(1, Ordering::Relaxed);
        host.log(LogLevel::Debug, "plg-good initialized");
        Ok(())
    }
}

declare_plugin!(Good, name = "plg-good", version = "1.0.0");

/// The function tests call to prove the host still works.
#[unsafe(no_mangle)]
pub extern "C" fn plg_good_add(a: u64, b: u64) -> u64 {
    a.wrapping_add(b)
}

/// How many times `on_init` ran in this mapping of the library.
#[unsafe(no_mangle)]
pub extern "C" fn plg_good_inits() -> u32 {
    INITS.load(Ordering::Relaxed)
}
