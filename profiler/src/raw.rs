//! What a session captures before resolution: raw stacks per epoch and
//! the facts a stopping session knows of itself. Shared by the session
//! (which fills them), the capture (which ships them to another process)
//! and the report (which resolves them), none of which needs the others'
//! files for it.

use hotpatch_symbolizer::Seq;
use serde::{Deserialize, Serialize};

use crate::sampler::Clock;

/// Samples taken between two checkpoints, with the registry sequence number
/// at which they are to be resolved.
#[derive(Debug, Default, Clone)]
pub(crate) struct Epoch {
    pub(crate) seq: Seq,
    pub(crate) samples: Vec<RawSample>,
}

/// One captured stack: leaf first. The leaf is the interrupted instruction
/// (exact, from the signal's `ucontext`); the others are return addresses.
#[derive(Debug, Clone)]
pub(crate) struct RawSample {
    pub(crate) stack: Vec<u64>,
    pub(crate) count: u64,
    pub(crate) thread: String,
    /// Whether the signal frame was found (the callers are the interrupted
    /// code's; without it the stack is the leaf alone).
    pub(crate) anchored: bool,
    /// The CPU time these samples stand for, in nanoseconds (the sum of
    /// their periods, overruns of a thread timer included).
    pub(crate) value_ns: u64,
}

/// The sampler's counters of one session, as [`Stats`](crate::Stats) has
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerCounts {
    /// See [`Stats::handlers_left_by_jump`](crate::Stats::handlers_left_by_jump).
    pub handlers_left_by_jump: u64,
    /// See [`Stats::signals`](crate::Stats::signals).
    pub signals: u64,
    /// See [`Stats::lost_buffer_full`](crate::Stats::lost_buffer_full).
    pub lost_buffer_full: u64,
    /// See [`Stats::threads_clocked`](crate::Stats::threads_clocked).
    pub threads_clocked: u64,
    /// See [`Stats::thread_clock_failures`](crate::Stats::thread_clock_failures).
    pub thread_clock_failures: u64,
    /// See [`Stats::thread_clock_fallbacks`](crate::Stats::thread_clock_fallbacks).
    pub thread_clock_fallbacks: u64,
    /// See [`Stats::empty_stack_copies`](crate::Stats::empty_stack_copies).
    #[serde(default)]
    pub empty_stack_copies: u64,
    /// See [`Stats::truncated_stack_copies`](crate::Stats::truncated_stack_copies).
    #[serde(default)]
    pub truncated_stack_copies: u64,
    /// See [`Stats::late_samples_discarded`](crate::Stats::late_samples_discarded).
    #[serde(default)]
    pub late_samples_discarded: u64,
    /// See [`Stats::clocks_skipped`](crate::Stats::clocks_skipped).
    #[serde(default)]
    pub clocks_skipped: Vec<String>,
}

/// What a stopping session knows of itself beyond its samples.
#[derive(Debug, Clone)]
pub(crate) struct SessionFacts {
    /// Samples dropped at the gate and registrations skipped.
    pub(crate) gate: (u64, u64),
    /// The clock that drove sampling.
    pub(crate) clock: Clock,
    /// The sampler's counters.
    pub(crate) sampler: SamplerCounts,
}

/// A stopped session's capture as resolution takes it: the samples per
/// epoch and what the report says about the session.
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    /// The samples, per checkpoint.
    pub(crate) epochs: Vec<Epoch>,
    /// Problems met while checkpointing.
    pub(crate) errors: Vec<String>,
    /// Whether inline frames are to be expanded.
    pub(crate) inline_frames: bool,
    /// Sampling frequency (Hz).
    pub(crate) frequency: i32,
    /// When sampling started.
    pub(crate) start_time: std::time::SystemTime,
    /// How long it ran.
    pub(crate) duration: std::time::Duration,
    /// The profiled process's executable (its mapping goes first in the
    /// pprof output); `None` when unknown.
    pub(crate) main_executable: Option<std::path::PathBuf>,
}

/// The running process's executable, canonical.
pub(crate) fn current_executable() -> Option<std::path::PathBuf> {
    std::env::current_exe()
        .ok()
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}
