//! Hex text of byte strings: the bundle's and the facts cache's encoding
//! (its own file so `bundle` and `exe` both use it without importing each
//! other).

use crate::error::{E_WATCH_BAD_BUNDLE, Error, Result};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string.
///
/// # Errors
/// `E_WATCH_BAD_BUNDLE` for odd length or a non-hex digit.
pub fn unhex(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return Err(Error::new(E_WATCH_BAD_BUNDLE, "odd-length hex"));
    }
    let digit = |c: u8| -> Result<u8> {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| Error::new(E_WATCH_BAD_BUNDLE, "a non-hex digit"))
    };
    b.chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}
