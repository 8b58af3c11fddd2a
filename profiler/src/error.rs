//! The profiler's error type: one variant per failure, each with a stable code.

/// Another session is running ([`Error::AlreadyRunning`]).
pub const E_PROF_ALREADY_RUNNING: &str = "E_PROF_ALREADY_RUNNING";
/// The frequency is out of range ([`Error::BadFrequency`]).
pub const E_PROF_BAD_FREQUENCY: &str = "E_PROF_BAD_FREQUENCY";
/// The pprof sampler failed ([`Error::Sampler`]).
pub const E_PROF_SAMPLER: &str = "E_PROF_SAMPLER";
/// No sampling clock could be set up ([`Error::Clock`]).
pub const E_PROF_CLOCK: &str = "E_PROF_CLOCK";
/// Writing an output failed ([`Error::Io`]).
pub const E_PROF_IO: &str = "E_PROF_IO";
/// The flamegraph renderer failed ([`Error::Flamegraph`]).
pub const E_PROF_FLAMEGRAPH: &str = "E_PROF_FLAMEGRAPH";
/// A raw capture is malformed or over a limit ([`Error::BadCapture`]).
pub const E_PROF_BAD_CAPTURE: &str = "E_PROF_BAD_CAPTURE";
/// SIGPROF has a disposition the host set ([`Error::SignalTaken`]).
pub const E_PROF_SIGNAL_TAKEN: &str = "E_PROF_SIGNAL_TAKEN";

/// A specialized `Result` for the profiler.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why starting, checkpointing or writing a profile failed.
///
/// Match on [`Error::code`] in scripts: the codes are stable, the messages
/// are not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another [`Session`](crate::Session) is running: the SIGPROF sampler is
    /// process-wide, so there can be one at a time.
    #[error("a profiling session is already running in this process; stop it first")]
    AlreadyRunning,
    /// The frequency is outside `1..=10_000` Hz.
    #[error("sampling frequency {0} Hz is out of range (1..=10000)")]
    BadFrequency(i32),
    /// The `pprof` sampler refused to start or report.
    #[error("pprof sampler: {0}")]
    Sampler(#[from] pprof::Error),
    /// No sampling clock could be set up (each clock tried, and why it
    /// failed), or the helper thread could not start.
    #[error("sampling clock: {0}")]
    Clock(String),
    /// Writing an output failed.
    #[error("writing profile output: {0}")]
    Io(#[from] std::io::Error),
    /// The flamegraph renderer failed.
    #[error("flamegraph: {0}")]
    Flamegraph(String),
    /// A raw capture (`RawProfile`) received from another process is
    /// malformed or over a limit.
    #[error("bad raw profile: {0}")]
    BadCapture(String),
    /// SIGPROF already has a handler (or `SIG_IGN`) the host set: the
    /// sampler would replace it, so the session is refused instead (issue
    /// #15: an attached agent never overwrites a host's disposition).
    #[error("{0}")]
    SignalTaken(String),
}

impl Error {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::AlreadyRunning => E_PROF_ALREADY_RUNNING,
            Error::BadFrequency(_) => E_PROF_BAD_FREQUENCY,
            Error::Sampler(_) => E_PROF_SAMPLER,
            Error::Clock(_) => E_PROF_CLOCK,
            Error::Io(_) => E_PROF_IO,
            Error::Flamegraph(_) => E_PROF_FLAMEGRAPH,
            Error::BadCapture(_) => E_PROF_BAD_CAPTURE,
            Error::SignalTaken(_) => E_PROF_SIGNAL_TAKEN,
        }
    }
}
