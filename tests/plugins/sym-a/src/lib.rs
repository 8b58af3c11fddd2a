//! Symbolizer test fixture A: exported entry points, a local (non-exported)
//! helper, an always-inlined helper, and enough varied code (formatting,
//! sorting, hashing) for a few hundred distinct addresses to compare with
//! binutils' `addr2line`.

use std::collections::HashMap;
use std::hint::black_box;

/// Always inlined into its callers: shows up as an inline frame.
#[inline(always)]
fn sym_a_inlined_mix(x: u64) -> u64 {
    x.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15
}

/// A local function: in `.symtab`, not exported.
#[inline(never)]
fn sym_a_local_helper(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.iter()
        .fold(0, |acc, &x| acc.wrapping_add(sym_a_inlined_mix(x)))
}

/// Exported entry point: does some work and returns a recognizable value.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sym_a_entry(x: u64) -> u64 {
    let mut v: Vec<u64> = (0..black_box(x % 64 + 8))
        .map(|i| i * 2654435761 % 97)
        .collect();
    sym_a_local_helper(&mut v).wrapping_add(sym_a_inlined_mix(x))
}

/// Builds a string and a map: pulls formatting and hashing code in.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sym_a_describe(x: u64) -> usize {
    let mut m: HashMap<String, u64> = HashMap::new();
    for i in 0..black_box(x % 16 + 1) {
        m.insert(format!("key-{i}-{x:#x}"), i * x);
    }
    let s = format!("{:?}", m.values().max());
    s.len() + m.len()
}

/// Identifies the plugin at runtime.
#[unsafe(no_mangle)]
pub extern "C" fn sym_a_id() -> u64 {
    0xA
}
