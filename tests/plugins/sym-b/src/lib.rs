//! Symbolizer test fixture B: a second plugin with different names, loaded
//! into the address range that fixture A vacated.

use std::hint::black_box;

#[inline(never)]
fn sym_b_local_helper(x: u64) -> u64 {
    (0..black_box(x % 32 + 4))
        .map(|i| i.wrapping_mul(x) ^ 0x5555)
        .sum()
}

/// Exported entry point of fixture B.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sym_b_entry(x: u64) -> u64 {
    sym_b_local_helper(x).wrapping_mul(3)
}

/// Identifies the plugin at runtime.
#[unsafe(no_mangle)]
pub extern "C" fn sym_b_id() -> u64 {
    0xB
}
