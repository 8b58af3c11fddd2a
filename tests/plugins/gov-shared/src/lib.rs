//! Governance test fixture: a type both host and plugin use.

/// A value that crosses the boundary; its layout is what drift would break.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shared {
    /// First field in every version.
    pub a: u64,
}

/// This build's version of the crate.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
