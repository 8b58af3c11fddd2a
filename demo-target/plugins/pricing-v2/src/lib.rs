//! demo-target plugin: price list v2. Same API as `pricing-v1`: one
//! `extern "C" fn(item: u64) -> u64` quoting an item in cents, tagged with
//! its price list (`3xxx` for v2), to be patched over the host's
//! `demo_price`. Counts calls per thread in a thread-local.

use std::cell::Cell;
use std::hint::black_box;

use hotpatch_plugin_api::{HostApi, Lifecycle, LogLevel, PluginError, declare_plugin};

thread_local! {
    // `const` and without `Drop`: no TLS destructor is registered, so
    // `dlclose` really unmaps the plugin.
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

struct PricingV2;

impl Lifecycle for PricingV2 {
    fn on_init(host: &HostApi) -> Result<(), PluginError> {
        host.log(LogLevel::Info, "pricing v2 ready");
        Ok(())
    }
}

declare_plugin!(PricingV2, name = "pricing-v2", version = "2.0.0");

/// The price-list tag of v2 quotes: `3000..4000`.
pub const TAG: u64 = 3000;

/// Quotes `item` with price list v2: `3000 + (a slow hash of the item) % 1000`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn pricing_v2_quote(item: u64) -> u64 {
    CALLS.with(|c| c.set(c.get() + 1));
    TAG + pricing_v2_hash(item) % 1000
}

/// The hot loop of v2 (kept out of line so profiles show it by name).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn pricing_v2_hash(item: u64) -> u64 {
    let mut h = black_box(item) ^ 0x9e37_79b9_7f4a_7c15;
    for i in 0..20_000u64 {
        h = black_box(h.rotate_left(7) ^ i).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Calls of [`pricing_v2_quote`] on the calling thread.
#[unsafe(no_mangle)]
pub extern "C" fn pricing_v2_calls_on_this_thread() -> u64 {
    CALLS.with(Cell::get)
}
