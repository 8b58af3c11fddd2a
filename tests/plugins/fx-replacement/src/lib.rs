//! Test fixture: replacement functions loaded with `dlopen` and installed over
//! host functions by the patcher tests.

/// Version 2 of the hosts' `price` function: a different, recognizable result.
#[unsafe(no_mangle)]
pub extern "C" fn fx_price_v2(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(7)
}

/// Version 3, used to test `swap` between two plugin functions.
#[unsafe(no_mangle)]
pub extern "C" fn fx_price_v3(x: u64) -> u64 {
    x.wrapping_mul(5).wrapping_add(11)
}
