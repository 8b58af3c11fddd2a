//! demo-target plugin: price list v1. Same API as `pricing-v2`: one
//! `extern "C" fn(item: u64) -> u64` quoting an item in cents, tagged with
//! its price list (`2xxx` for v1), to be patched over the host's
//! `demo_price`. Counts calls per thread in a thread-local.

use std::cell::Cell;
use std::hint::black_box;

use hotpatch_plugin_api::{HostApi, Lifecycle, LogLevel, PluginError, declare_plugin};

thread_local! {
    // `const` and without `Drop`: no TLS destructor is registered, so
    // `dlclose` really unmaps the plugin.
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

struct PricingV1;

impl Lifecycle for PricingV1 {
    fn on_init(host: &HostApi) -> Result<(), PluginError> {
        host.log(LogLevel::Info, "pricing v1 ready");
        Ok(())
    }
}

declare_plugin!(PricingV1, name = "pricing-v1", version = "1.0.0");

/// The price-list tag of v1 quotes: `2000..3000`.
pub const TAG: u64 = 2000;

/// Quotes `item` with price list v1: `2000 + (a slow hash of the item) % 1000`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn pricing_v1_quote(item: u64) -> u64 {
    CALLS.with(|c| c.set(c.get() + 1));
    TAG + pricing_v1_hash(item) % 1000
}

/// The hot loop of v1 (kept out of line so profiles show it by name).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn pricing_v1_hash(item: u64) -> u64 {
    let mut h = black_box(item) ^ 0x9e37_79b9_7f4a_7c15;
    for i in 0..20_000u64 {
        h = black_box(h.rotate_left(5) ^ i).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Calls of [`pricing_v1_quote`] on the calling thread.
#[unsafe(no_mangle)]
pub extern "C" fn pricing_v1_calls_on_this_thread() -> u64 {
    CALLS.with(Cell::get)
}
