//! The client's error type: finding an agent and talking to it.

use std::path::PathBuf;

use hotpatch_protocol::ErrorBody;

/// What can go wrong finding an agent or talking to one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No running agent was found.
    #[error("E_AGENT_NOT_RUNNING: {detail}")]
    NotRunning {
        /// What was looked for, where.
        detail: String,
    },
    /// Several agents run and none was chosen.
    #[error("E_AGENT_AMBIGUOUS: several agents are running (pids {pids:?}); pass --pid")]
    Ambiguous {
        /// Their pids.
        pids: Vec<u32>,
    },
    /// The socket, its directory or its server is not the user's own:
    /// nothing was sent.
    #[error("E_AGENT_UNTRUSTED: refusing to talk to {}: {why}; nothing was sent", path.display())]
    Untrusted {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Connecting to an agent's socket failed.
    #[error("E_AGENT_CONNECT: cannot connect to {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("E_AGENT_IO: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent's reply did not follow the protocol.
    #[error("E_AGENT_PROTOCOL: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The agent answered with an error.
    #[error("{0}")]
    Remote(ErrorBody),
}

impl Error {
    /// The stable code: the agent's own, or the one the agent replied with.
    pub fn code(&self) -> &str {
        match self {
            Error::NotRunning { .. } => "E_AGENT_NOT_RUNNING",
            Error::Ambiguous { .. } => "E_AGENT_AMBIGUOUS",
            Error::Untrusted { .. } => hotpatch_protocol::E_AGENT_UNTRUSTED,
            Error::Connect { .. } => "E_AGENT_CONNECT",
            Error::Io { .. } => "E_AGENT_IO",
            Error::Protocol { .. } => "E_AGENT_PROTOCOL",
            Error::Remote(b) => &b.code,
        }
    }
}

/// `Result` with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
