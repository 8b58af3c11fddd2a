//! The heap profiler's error type: one variant per failure, each with a
//! stable code.

/// A specialized `Result` for the heap profiler.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why starting, snapshotting, stopping or a leak check failed.
///
/// Match on [`Error::code`] in scripts: the codes are stable, the messages
/// are not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `snapshot` or `stop` without a running session.
    #[error("no heap profiling session is running; start one first")]
    NotStarted,
    /// `start` while a session runs (the allocator hooks are process-wide).
    #[error("a heap profiling session is already running in this process")]
    AlreadyStarted,
    /// `stop` (or a second `snapshot`) while a snapshot is being taken.
    #[error("a heap snapshot is in progress; retry when it has finished")]
    Busy,
    /// The sampling rate is outside `1..=1 GiB` bytes.
    #[error("sampling rate {0} bytes is out of range (1..=1073741824)")]
    BadRate(u64),
    /// The module providing `malloc` to the process is not an allocator the
    /// sampler knows (glibc, jemalloc, mimalloc, tcmalloc).
    #[error("malloc is provided by {module}, not an allocator hotpatch recognises ({detail})")]
    UnknownAllocator {
        /// The module (path) `malloc` resolves to, or what was found.
        module: String,
        /// Why it was not accepted.
        detail: String,
    },
    /// The allocator's entry point could not be patched.
    #[error("cannot patch {symbol} in {module}: {source}")]
    Patch {
        /// The entry point.
        symbol: String,
        /// Its module.
        module: String,
        /// The patcher's refusal.
        #[source]
        source: hotpatch_patcher::Error,
    },
    /// Removing a site failed; it was disabled instead (calls run the
    /// original allocator), the session is over, and the next `start`
    /// retries the removal first.
    #[error(
        "could not restore {symbol}: {source} (the site was disabled instead; the next start removes it first)"
    )]
    Restore {
        /// The entry point.
        symbol: String,
        /// The patcher's error.
        #[source]
        source: hotpatch_patcher::Error,
    },
    /// The sampler's tables could not be mapped.
    #[error("cannot map the sampler's tables: {0}")]
    NoMemory(std::io::Error),
    /// A leak check could not load, run or unload the plugin.
    #[error("leak check: {0}")]
    Plugin(#[from] hotpatch_loader::Error),
    /// A leak check's entry point was not found in the plugin.
    #[error("leak check: the plugin has no entry point {0} (extern \"C\" fn())")]
    NoEntryPoint(String),
    /// A leak check was asked for 0 cycles.
    #[error("leak check: --cycles must be at least 1")]
    NoCycles,
    /// Reading or writing a profile failed.
    #[error("heap profile I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A file given to `diff` is not a heap profile.
    #[error("{path}: not a heap profile ({detail})")]
    NotAHeapProfile {
        /// The file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl Error {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotStarted => "E_HEAP_NOT_STARTED",
            Error::AlreadyStarted => "E_HEAP_ALREADY_STARTED",
            Error::Busy => "E_HEAP_BUSY",
            Error::BadRate(_) => "E_HEAP_BAD_RATE",
            Error::UnknownAllocator { .. } => "E_HEAP_UNKNOWN_ALLOCATOR",
            Error::Patch { .. } => "E_HEAP_PATCH",
            Error::Restore { .. } => "E_HEAP_RESTORE",
            Error::NoMemory(_) => "E_HEAP_NO_MEMORY",
            Error::Plugin(_) => "E_HEAP_PLUGIN",
            Error::NoEntryPoint(_) => "E_HEAP_NO_ENTRY_POINT",
            Error::NoCycles => "E_HEAP_NO_CYCLES",
            Error::Io(_) => "E_HEAP_IO",
            Error::NotAHeapProfile { .. } => "E_HEAP_NOT_A_PROFILE",
        }
    }
}
