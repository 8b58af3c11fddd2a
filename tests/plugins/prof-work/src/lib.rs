//! Profiler test fixture: loaded after the profiler starts; burns CPU.

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

struct Work;

impl Lifecycle for Work {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        Ok(())
    }
}

declare_plugin!(Work, name = "prof-work", version = "1.0.0");

/// Spins for `iters` rounds of a multiply-xorshift; returns the state.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn prof_work_burn(iters: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..iters {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
        x ^= x >> 29;
    }
    std::hint::black_box(x)
}
