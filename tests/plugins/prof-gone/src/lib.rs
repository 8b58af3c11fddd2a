//! Profiler test fixture: unloaded (really unmapped: no thread-local
//! destructors) before the profile is reported; burns CPU.

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

struct Gone;

impl Lifecycle for Gone {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        Ok(())
    }
}

declare_plugin!(Gone, name = "prof-gone", version = "1.0.0");

/// Spins for `iters` rounds of an add-rotate; returns the state.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn prof_gone_burn(iters: u64) -> u64 {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..iters {
        x = x.rotate_left(7).wrapping_add(i ^ 0x5555);
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    }
    std::hint::black_box(x)
}
