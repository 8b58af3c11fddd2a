//! In-process control agent for hotpatch.
//!
//! A dev process calls [`start`] once; the returned [`Agent`] listens on a
//! Unix socket, `$XDG_RUNTIME_DIR/hotpatch/<pid>.sock` (or
//! `$TMPDIR/hotpatch-<uid>/<pid>.sock`, `/tmp` by default), in a directory
//! of mode 0700, the socket itself 0600, and serves only peers of the same
//! uid (`SO_PEERCRED`). The client trusts only such a socket, served by a
//! process of its own uid with the pid in the socket's name (the client in
//! `hotpatch-cli`). From another terminal, the `hotpatch` CLI (crate
//! `hotpatch-cli`) loads plugins into it, patches its functions, profiles
//! it, and reverts. This crate is what a host process links: the server and
//! what it drives, no CLI (no `clap`).
//!
//! ```no_run
//! // In the dev process:
//! let _agent = hotpatch_agent::Builder::new()
//!     .status(|| serde_json::json!({ "requests": 42 }))
//!     .start()?;
//! // ... run as usual; dropping `_agent` reverts patches, unloads plugins
//! // and removes the socket.
//! # Ok::<(), hotpatch_agent::Error>(())
//! ```
//!
//! The wire format is in the `hotpatch-protocol` crate ([`protocol`]): one
//! JSON object per line; errors carry stable codes. Bad input (garbage,
//! truncated JSON, lines over [`protocol::MAX_LINE`], unknown commands, bad arguments) gets an error
//! reply and the host keeps serving; each connection has its own thread and
//! a read timeout.

mod control;
mod error;
mod heap;
mod profile;
mod server;
pub mod sys;

pub use control::split_spec;
pub use error::{Error, Result};
pub use hotpatch_protocol::{self as protocol, paths};
pub use server::{Agent, Builder, StatusFn};
pub use sys::TerminationSignals;

/// Starts an agent with the defaults of [`Builder::new`].
///
/// # Errors
/// `E_AGENT_SOCKET` when the socket cannot be set up.
pub fn start() -> Result<Agent> {
    Builder::new().start()
}
