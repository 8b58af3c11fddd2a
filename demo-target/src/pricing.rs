//! The functions the tour patches: `demo_price` (exported, unmangled) and
//! `apply_tax` (a local Rust function, found by its demangled path
//! `demo_target::pricing::apply_tax`).

use std::hint::black_box;

/// Price-list tag of the built-in quotes: `1000..2000`. Plugins use
/// `2000..` (v1) and `3000..` (v2), so a quote says which code made it.
pub const BUILTIN_TAG: u64 = 1000;

/// Quotes `item` in cents with the built-in price list. Patched by the tour
/// to `pricing-v1:pricing_v1_quote`, then swapped to v2.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn demo_price(item: u64) -> u64 {
    // The hot loop is written out here rather than called: a `call` among
    // the first five bytes would make the entry unpatchable
    // (E_PATCH_CALL_IN_PATCH; try `hotpatch inspect demo_price`).
    let mut h = black_box(item) ^ 0x51_7cc1_b727_220a;
    for i in 0..20_000u64 {
        h = black_box(h.rotate_left(3) ^ i).wrapping_mul(0x100_0000_01b3);
    }
    BUILTIN_TAG + h % 1000
}

/// Adds tax to `cents`. The bug: 190% instead of 19%; `pricing-fix` has the
/// fixed version. Not exported: found through the symbol table.
#[inline(never)]
pub extern "C" fn apply_tax(cents: u64) -> u64 {
    black_box(cents) + cents * 19 / 10
}

/// Which code produced `price`: `builtin`, `v1`, `v2` or `?`.
pub fn engine_of(price: u64) -> &'static str {
    match price / 1000 {
        1 => "builtin",
        2 => "v1",
        3 => "v2",
        _ => "?",
    }
}
