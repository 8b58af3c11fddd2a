//! The client's error type: finding an agent and talking to it.

use std::path::PathBuf;

use hotpatch_protocol::{Coded, ErrorBody};

/// No running agent was found.
pub const E_AGENT_NOT_RUNNING: &str = "E_AGENT_NOT_RUNNING";
/// Several agents run and none was chosen.
pub const E_AGENT_AMBIGUOUS: &str = "E_AGENT_AMBIGUOUS";
/// Connecting to an agent's socket failed.
pub const E_AGENT_CONNECT: &str = "E_AGENT_CONNECT";
/// Reading or writing the connection (or the output files) failed.
pub const E_AGENT_IO: &str = "E_AGENT_IO";
/// The agent's reply did not follow the protocol.
pub const E_AGENT_PROTOCOL: &str = "E_AGENT_PROTOCOL";
/// The agent sent no reply within the read bound (`HOTPATCH_TIMEOUT`).
pub const E_AGENT_TIMEOUT: &str = "E_AGENT_TIMEOUT";
/// An environment variable the client reads has a value it cannot use.
pub const E_AGENT_BAD_ENV: &str = "E_AGENT_BAD_ENV";

/// What can go wrong finding an agent or talking to one. `Display` is the
/// message, without the code ([`Error::code`]; [`Coded::to_body`] has both).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No running agent was found.
    #[error("{detail}")]
    NotRunning {
        /// What was looked for, where.
        detail: String,
    },
    /// Several agents run and none was chosen.
    #[error("several agents are running (pids {pids:?}); pass --pid")]
    Ambiguous {
        /// Their pids.
        pids: Vec<u32>,
    },
    /// The socket, its directory or its server is not the user's own:
    /// nothing was sent.
    #[error("refusing to talk to {}: {why}; nothing was sent", path.display())]
    Untrusted {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Connecting to an agent's socket failed.
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent's reply did not follow the protocol.
    #[error("{detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The agent sent no reply within `secs` seconds: it is stuck or far
    /// slower than any request needs. Nothing more is read.
    #[error(
        "the agent (pid {pid}) sent no reply within {secs} s; it may be stuck \
         (`gdb -p {pid} -batch -ex 'thread apply all bt'` shows where), or set \
         HOTPATCH_TIMEOUT=SECONDS (0: no bound) for a longer wait"
    )]
    Timeout {
        /// The agent's pid (from the socket's peer credentials).
        pid: i32,
        /// The bound that passed.
        secs: u64,
    },
    /// An environment variable has a value the client cannot use.
    #[error("{name}={value:?}: {why}")]
    BadEnv {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The agent answered with an error.
    #[error("{}", .0.message)]
    Remote(ErrorBody),
}

impl Error {
    /// The stable code: the agent's own, or the one the agent replied with.
    pub fn code(&self) -> &str {
        match self {
            Error::NotRunning { .. } => E_AGENT_NOT_RUNNING,
            Error::Ambiguous { .. } => E_AGENT_AMBIGUOUS,
            Error::Untrusted { .. } => hotpatch_protocol::E_AGENT_UNTRUSTED,
            Error::Connect { .. } => E_AGENT_CONNECT,
            Error::Io { .. } => E_AGENT_IO,
            Error::Protocol { .. } => E_AGENT_PROTOCOL,
            Error::Timeout { .. } => E_AGENT_TIMEOUT,
            Error::BadEnv { .. } => E_AGENT_BAD_ENV,
            Error::Remote(b) => &b.code,
        }
    }
}

impl Coded for Error {
    fn code(&self) -> &str {
        Error::code(self)
    }
}

/// `Result` with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
