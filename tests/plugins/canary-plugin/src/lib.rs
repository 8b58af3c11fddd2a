//! Canary test fixture: replacements of `canary-host`'s
//! `canary_target(x) = 3x + 1`, declared with `canary_replacement!`.

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, canary_replacement, declare_plugin};

struct Canary;

impl Lifecycle for Canary {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        // Caught panics are expected here: keep stderr quiet.
        std::panic::set_hook(Box::new(|_| {}));
        Ok(())
    }
}

declare_plugin!(Canary, name = "canary-plugin", version = "1.0.0");

canary_replacement! {
    /// The same value as the current code, but panics on 1 input in 100
    /// (`x % 100 == 42`).
    fn canary_panicky(x: u64) -> u64 {
        if x % 100 == 42 {
            panic!("canary_panicky: input {x}");
        }
        x.wrapping_mul(3).wrapping_add(1)
    }
}

canary_replacement! {
    /// A clean new version with a distinguishable result: `3x + 2`.
    fn canary_clean(x: u64) -> u64 {
        x.wrapping_mul(3).wrapping_add(2)
    }
    error_if = |r: &u64| *r % 3 == 0;
}

canary_replacement! {
    /// Returns the current code's value, but an "error" (`u64::MAX`) on
    /// 1 input in 4.
    fn canary_erring(x: u64) -> u64 {
        if x % 4 == 1 {
            u64::MAX
        } else {
            x.wrapping_mul(3).wrapping_add(1)
        }
    }
    error_if = |r: &u64| *r == u64::MAX;
}

/// A replacement without the canary exports (refused when
/// `--rollback-on` needs them).
#[unsafe(no_mangle)]
pub extern "C" fn canary_plain(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}
