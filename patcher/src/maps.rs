//! `/proc/self/maps` for the patcher: [`hotpatch_sys::maps`] (the one
//! reader, with the `PROCMAP_QUERY` fast path) with the patcher's errors.
//!
//! Allocates: never call this while the world is stopped.

pub use hotpatch_sys::maps::{Lookup, Mapping, find, parse, writable_executable};

use crate::error::{Error, Result};

/// Parses `/proc/self/maps`, sorted by address (the kernel's order).
///
/// # Errors
/// `E_PATCH_OS` when the file cannot be read.
pub fn read() -> Result<Vec<Mapping>> {
    hotpatch_sys::maps::read().map_err(|source| Error::Os {
        what: "reading /proc/self/maps",
        source,
    })
}

/// A [`Lookup`]: the ioctl where the kernel has it, else a snapshot.
///
/// # Errors
/// `E_PATCH_OS` when `/proc/self/maps` cannot be read.
pub fn lookup() -> Result<Lookup> {
    Lookup::new().map_err(|source| Error::Os {
        what: "reading /proc/self/maps",
        source,
    })
}
