//! Errors of `hotpatch-watch`, each with a stable `E_WATCH_*` code.

/// The running process is not the build watch diffs against (its
/// executable's build-id differs from the baseline's, or the baseline's
/// objects do not match its symbols).
pub const E_WATCH_BASELINE_MISMATCH: &str = "E_WATCH_BASELINE_MISMATCH";
/// The baseline's object files were not found (not a dev-profile,
/// incremental build, or the crate was rebuilt since the process started).
pub const E_WATCH_NO_OBJECTS: &str = "E_WATCH_NO_OBJECTS";
/// `cargo build` failed: the message is the compiler's; nothing changed.
pub const E_WATCH_BUILD: &str = "E_WATCH_BUILD";
/// An object file or executable did not parse.
pub const E_WATCH_OBJECT: &str = "E_WATCH_OBJECT";
/// A function's signature changed while some of its callers did not.
pub const E_WATCH_SIGNATURE_CHANGED: &str = "E_WATCH_SIGNATURE_CHANGED";
/// The layout of a type used by unchanged code changed.
pub const E_WATCH_LAYOUT_CHANGED: &str = "E_WATCH_LAYOUT_CHANGED";
/// A static's type or initializer changed: its state cannot be migrated.
pub const E_WATCH_STATIC_CHANGED: &str = "E_WATCH_STATIC_CHANGED";
/// The patcher refused a function (the message names it and the reason).
pub const E_WATCH_PATCH_REFUSED: &str = "E_WATCH_PATCH_REFUSED";
/// A symbol the new code refers to is not in the running process.
pub const E_WATCH_UNRESOLVED: &str = "E_WATCH_UNRESOLVED";
/// A relocation of an unsupported type, or whose value does not fit.
pub const E_WATCH_RELOCATION: &str = "E_WATCH_RELOCATION";
/// No memory could be mapped within reach of the executable.
pub const E_WATCH_NO_MEMORY: &str = "E_WATCH_NO_MEMORY";
/// A patch bundle is malformed (bad file, bad indexes, bad hex).
pub const E_WATCH_BAD_BUNDLE: &str = "E_WATCH_BAD_BUNDLE";
/// New code needs a thread-local the running process does not have.
pub const E_WATCH_NEW_TLS: &str = "E_WATCH_NEW_TLS";
/// An I/O or OS failure (the message says what).
pub const E_WATCH_IO: &str = "E_WATCH_IO";
/// Nothing to revert, or no process/agent found.
pub const E_WATCH_NOTHING: &str = "E_WATCH_NOTHING";

/// An error with its stable code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// One of the `E_WATCH_*` constants.
    pub code: &'static str,
    /// A sentence saying what and why (without the code).
    pub message: String,
}

impl Error {
    /// An error with `code` and `message`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

/// `Result` with the watch [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::new(E_WATCH_IO, format!("{what}: {e}"))
}
