//! The agent's error type (starting an agent).

use std::path::PathBuf;

/// What can go wrong starting an agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket directory or socket could not be set up.
    #[error("E_AGENT_SOCKET: {what} {}: {source}", path.display())]
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
            Error::Socket { .. } => "E_AGENT_SOCKET",
        }
    }
}

/// `Result` with the agent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
