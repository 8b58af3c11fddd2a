//! The agent's error type (starting an agent).

use std::path::PathBuf;

use hotpatch_protocol::Coded;

/// The socket directory or socket could not be set up.
pub const E_AGENT_SOCKET: &str = "E_AGENT_SOCKET";

/// What can go wrong starting an agent. `Display` is the message, without
/// the code ([`Error::code`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket directory or socket could not be set up.
    #[error("{what} {}: {source}", path.display())]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The stable code.
    pub fn code(&self) -> &str {
        match self {
            Error::Socket { .. } => E_AGENT_SOCKET,
        }
    }
}

impl Coded for Error {
    fn code(&self) -> &str {
        Error::code(self)
    }
}

/// `Result` with the agent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
