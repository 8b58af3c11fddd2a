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

/// Two `u64`s, passed as an aggregate (for the signature check).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FxPair {
    /// First.
    pub a: u64,
    /// Second.
    pub b: u64,
}

/// Same ABI as `fx_price_v2` but another signature in DWARF terms: a float
/// argument. Patching a `fn(u64) -> u64` with it must be refused.
#[unsafe(no_mangle)]
pub extern "C" fn fx_sig_float(x: f64) -> u64 {
    x as u64
}

/// Two parameters of different kinds and a narrower result.
#[unsafe(no_mangle)]
pub extern "C" fn fx_sig_two(p: *const u8, n: u32) -> u32 {
    if p.is_null() { 0 } else { n }
}

/// An aggregate in and out.
#[unsafe(no_mangle)]
pub extern "C" fn fx_sig_pair(p: FxPair) -> FxPair {
    FxPair { a: p.b, b: p.a }
}

/// No parameters, no result.
#[unsafe(no_mangle)]
pub extern "C" fn fx_sig_unit() {}

/// A type with a method, for signatures whose result type DWARF keeps on
/// the method's declaration (`DW_AT_specification`).
#[derive(Debug)]
pub struct FxCounter {
    /// Added to every argument.
    pub base: u64,
}

impl FxCounter {
    /// `&self` and a `u64`, returning a `u64`.
    #[unsafe(no_mangle)]
    pub extern "C" fn fx_sig_method(&self, x: u64) -> u64 {
        self.base.wrapping_add(x)
    }
}
