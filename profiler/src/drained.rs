//! What both sampling paths hand to the session: a drained sample, and the
//! most frames one keeps. Its own file so that `sampler.rs` (the signal
//! path, which owns the per-thread clocks, rings included) and `ring.rs`
//! (the perf-ring path) both use it without importing each other.

/// Frames kept per sample (the handler's own included).
pub(crate) const MAX_FRAMES: usize = 128;

/// One drained sample, before aggregation.
pub(crate) struct Drained {
    pub stack: Vec<u64>,
    pub anchored: bool,
    pub name: String,
    pub value_ns: u64,
}
