//! The client side: find an agent and talk to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::paths;
use crate::protocol::{PayloadHeader, Reply, Request};
use hotpatch_sys::cred as sys;

/// The socket of the agent to talk to: `socket` if given, else the socket of
/// `pid` (in the current socket directory, else in the fallback one), else
/// the only live agent of the current socket directory whose socket passes
/// [`paths::check_trusted`] (others are ignored). Whom it reaches is
/// checked by [`Client::connect`].
///
/// # Errors
/// `E_AGENT_NOT_RUNNING`, `E_AGENT_AMBIGUOUS`.
pub fn locate(pid: Option<u32>, socket: Option<&Path>) -> Result<PathBuf> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    let found = paths::scan();
    if let Some(pid) = pid {
        return found
            .into_iter()
            .chain(paths::scan_dirs(&paths::other_dirs()))
            .find(|f| f.pid == pid)
            .map(|f| f.socket)
            .ok_or_else(|| Error::NotRunning {
                detail: format!("no agent socket for pid {pid} in {}", all_dirs_text()),
            });
    }
    let ignored: Vec<String> = found
        .iter()
        .filter_map(|f| {
            f.untrusted
                .as_ref()
                .map(|why| format!("{}: {why}", f.socket.display()))
        })
        .collect();
    let live: Vec<_> = found
        .into_iter()
        .filter(|f| f.alive && f.untrusted.is_none())
        .collect();
    match live.len() {
        0 => Err(Error::NotRunning {
            detail: format!(
                "no running agent in {}{}; start one (e.g. `cargo run --release -p demo-target -- serve`), \
                 or name one with --pid or --socket",
                dirs_text(),
                if ignored.is_empty() {
                    String::new()
                } else {
                    format!(" (ignored, not ours: {})", ignored.join("; "))
                }
            ),
        }),
        1 => Ok(live
            .into_iter()
            .next()
            .map(|f| f.socket)
            .unwrap_or_default()),
        _ => Err(Error::Ambiguous {
            pids: live.iter().map(|f| f.pid).collect(),
        }),
    }
}

fn all_dirs_text() -> String {
    paths::search_dirs()
        .iter()
        .chain(&paths::other_dirs())
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

fn dirs_text() -> String {
    paths::search_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// How long a read from the agent may block unless a command sets its own
/// bound: a hang guard (every request the agent serves answers in seconds;
/// the ones that take longer, `profile`, `heap`, `leak-check`, set theirs).
pub const DEFAULT_READ_TIMEOUT_SECS: u64 = 300;

/// The read bound: `HOTPATCH_TIMEOUT` (whole seconds, `0` for none) or
/// [`DEFAULT_READ_TIMEOUT_SECS`].
///
/// # Errors
/// `E_AGENT_BAD_ENV` when `HOTPATCH_TIMEOUT` is not a whole number.
pub fn read_timeout_from_env() -> Result<Option<Duration>> {
    const NAME: &str = "HOTPATCH_TIMEOUT";
    let Some(v) = std::env::var_os(NAME) else {
        return Ok(Some(Duration::from_secs(DEFAULT_READ_TIMEOUT_SECS)));
    };
    let text = v.to_string_lossy().into_owned();
    match text.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(s) => Ok(Some(Duration::from_secs(s))),
        Err(_) => Err(Error::BadEnv {
            name: NAME,
            value: text,
            why: "not a whole number of seconds (0: no bound)",
        }),
    }
}

/// A connection to an agent.
#[derive(Debug)]
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// The agent's pid, from the socket's peer credentials.
    pid: i32,
    /// The read bound in force, for the timeout message.
    timeout: Option<Duration>,
}

impl Client {
    /// Connects to the agent listening on `socket`, after checking that it
    /// is the user's own: the socket and its directory pass
    /// [`paths::check_trusted`], and the server's `SO_PEERCRED` shows our
    /// uid and, for a socket named `<pid>.sock`, that pid. Nothing is sent
    /// before.
    ///
    /// # Errors
    /// `E_AGENT_UNTRUSTED`, `E_AGENT_CONNECT`.
    pub fn connect(socket: &Path) -> Result<Client> {
        let untrusted = |why: String| Error::Untrusted {
            path: socket.to_path_buf(),
            why,
        };
        paths::check_trusted(socket).map_err(untrusted)?;
        let stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        let cred = sys::peer_cred(&stream)
            .map_err(|e| untrusted(format!("cannot read the server's credentials: {e}")))?;
        let me = sys::uid();
        if cred.uid != me {
            return Err(untrusted(format!(
                "the process serving it (pid {}) runs as uid {}, not as uid {me} (us)",
                cred.pid, cred.uid
            )));
        }
        if let Some(named) = paths::pid_of_socket(socket) {
            if u32::try_from(cred.pid).ok() != Some(named) {
                return Err(untrusted(format!(
                    "the process serving it is pid {}, not pid {named} as its name says",
                    cred.pid
                )));
            }
        }
        let reader = stream.try_clone().map_err(|source| Error::Io {
            what: "clone the socket",
            source,
        })?;
        let mut c = Client {
            writer: stream,
            reader: BufReader::new(reader),
            pid: cred.pid,
            timeout: None,
        };
        c.set_read_timeout(read_timeout_from_env()?)?;
        Ok(c)
    }

    /// The error for a failed read: a passed read bound is
    /// `E_AGENT_TIMEOUT`, anything else `E_AGENT_IO`.
    fn read_error(&self, what: &'static str, source: std::io::Error) -> Error {
        match (source.kind(), self.timeout) {
            (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(t)) => {
                Error::Timeout {
                    pid: self.pid,
                    secs: t.as_secs(),
                }
            }
            _ => Error::Io { what, source },
        }
    }

    /// Sets how long a read may block (`None`: forever).
    ///
    /// # Errors
    /// `E_AGENT_IO`.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> Result<()> {
        self.reader
            .get_ref()
            .set_read_timeout(t)
            .map_err(|source| Error::Io {
                what: "set the read timeout",
                source,
            })?;
        self.timeout = t;
        Ok(())
    }

    /// Sends `req` and reads the reply. An error reply is `Ok` here (see
    /// [`Client::call`] for turning it into an error).
    ///
    /// # Errors
    /// `E_AGENT_IO`, `E_AGENT_PROTOCOL`.
    pub fn request(&mut self, req: &Request) -> Result<Reply> {
        let mut line = serde_json::to_vec(req).map_err(|e| Error::Protocol {
            detail: format!("cannot encode the request: {e}"),
        })?;
        line.push(b'\n');
        if let Err(send_err) = self.send_raw(&line) {
            // The agent may have answered and closed before reading (a
            // refused peer, a shutting-down host): its reply, if any, says
            // more than our broken pipe.
            return self.read_reply().map_or(Err(send_err), Ok);
        }
        self.read_reply()
    }

    /// Sends `req` and returns the result of a successful reply.
    ///
    /// # Errors
    /// The agent's error reply as [`Error::Remote`]; `E_AGENT_IO`,
    /// `E_AGENT_PROTOCOL`.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value> {
        let reply = self.request(req)?;
        into_result(reply)
    }

    /// Sends `req` and returns the result of a successful reply as `T`, the
    /// command's result type ([`hotpatch_protocol::reply`]).
    ///
    /// # Errors
    /// As [`Client::call`]; `E_AGENT_PROTOCOL` when the result is not a `T`.
    pub fn call_as<T: serde::de::DeserializeOwned>(&mut self, req: &Request) -> Result<T> {
        let reply = self.request(req)?;
        into_typed(reply)
    }

    /// Writes raw bytes (for tests of bad input).
    ///
    /// # Errors
    /// `E_AGENT_IO`.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
            .map_err(|source| Error::Io {
                what: "send the request",
                source,
            })
    }

    /// Reads one reply line.
    ///
    /// # Errors
    /// `E_AGENT_IO`; `E_AGENT_PROTOCOL` when the connection closes first or
    /// the line is not a reply.
    pub fn read_reply(&mut self) -> Result<Reply> {
        let mut line = Vec::new();
        if let Err(source) = self.reader.read_until(b'\n', &mut line) {
            return Err(self.read_error("read the reply", source));
        }
        if line.is_empty() {
            return Err(Error::Protocol {
                detail: "the agent closed the connection without a reply".into(),
            });
        }
        serde_json::from_slice(&line).map_err(|e| Error::Protocol {
            detail: format!("not a reply: {e}"),
        })
    }

    /// Reads the payloads a result announced, in order.
    ///
    /// # Errors
    /// `E_AGENT_IO` (including a connection closed early).
    pub fn read_payloads(&mut self, headers: &[PayloadHeader]) -> Result<Vec<Vec<u8>>> {
        headers
            .iter()
            .map(|h| {
                let mut buf = Vec::new();
                if let Err(source) = (&mut self.reader).take(h.len).read_to_end(&mut buf) {
                    return Err(self.read_error("read a payload", source));
                }
                if buf.len() as u64 != h.len {
                    return Err(Error::Protocol {
                        detail: format!(
                            "payload {} ended after {} of {} bytes",
                            h.name,
                            buf.len(),
                            h.len
                        ),
                    });
                }
                Ok(buf)
            })
            .collect()
    }
}

/// The result of a successful reply as `T`, or its error as
/// [`Error::Remote`].
///
/// # Errors
/// As [`into_result`]; `E_AGENT_PROTOCOL` when the result is not a `T`.
pub fn into_typed<T: serde::de::DeserializeOwned>(reply: Reply) -> Result<T> {
    let v = into_result(reply)?;
    serde_json::from_value(v).map_err(|e| Error::Protocol {
        detail: format!(
            "the result is not a {}: {e}",
            std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or_default()
        ),
    })
}

/// The result of a successful reply, or its error as [`Error::Remote`].
///
/// # Errors
/// [`Error::Remote`]; `E_AGENT_PROTOCOL` for a reply with neither.
pub fn into_result(reply: Reply) -> Result<serde_json::Value> {
    match (reply.ok, reply.result, reply.error) {
        (true, Some(r), _) => Ok(r),
        (true, None, _) => Ok(serde_json::Value::Null),
        (false, _, Some(e)) => Err(Error::Remote(e)),
        (false, _, None) => Err(Error::Protocol {
            detail: "an error reply without an error".into(),
        }),
    }
}
