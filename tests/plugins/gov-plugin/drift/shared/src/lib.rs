//! Governance test fixture: version 2.0.0 of the shared crate, with another
//! layout.

/// A value that crosses the boundary; 2.0.0 added a field.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shared {
    /// First field in every version.
    pub a: u64,
    /// New in 2.0.0.
    pub b: u64,
}

/// This build's version of the crate.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
