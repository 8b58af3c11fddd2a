//! demo-target plugin: the fix for the host's `apply_tax`, a local
//! (non-exported) function of the main binary that applies 190% tax
//! instead of 19%. Patch it with
//! `hotpatch patch demo_target::pricing::apply_tax --with pricing-fix:pricing_fix_apply_tax`.

use std::cell::Cell;

use hotpatch_plugin_api::{HostApi, Lifecycle, PluginError, declare_plugin};

thread_local! {
    static FIXED: Cell<u64> = const { Cell::new(0) };
}

struct PricingFix;

impl Lifecycle for PricingFix {
    fn on_init(_: &HostApi) -> Result<(), PluginError> {
        Ok(())
    }
}

declare_plugin!(PricingFix, name = "pricing-fix", version = "1.0.1");

/// `cents` plus 19% tax (the host's version adds 190%).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn pricing_fix_apply_tax(cents: u64) -> u64 {
    FIXED.with(|c| c.set(c.get() + 1));
    cents + cents * 19 / 100
}

/// Calls of [`pricing_fix_apply_tax`] on the calling thread.
#[unsafe(no_mangle)]
pub extern "C" fn pricing_fix_calls_on_this_thread() -> u64 {
    FIXED.with(Cell::get)
}
