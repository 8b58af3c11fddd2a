//! The listening side: socket setup, the accept loop, one thread per
//! connection, line framing with a length cap, the peer check.

use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::control::Control;
pub use crate::control::StatusFn;
use crate::error::{Error, Result};
use crate::paths;
use crate::protocol::{
    self, E_AGENT_BAD_JSON, E_AGENT_BUSY, E_AGENT_PEER_REFUSED, E_AGENT_TOO_LARGE, ErrorBody,
    Reply, Request,
};
use crate::wire::write_reply;
use hotpatch_sys::cred;

/// Configures and starts an agent. [`crate::start`] is
/// `Builder::new().start()`.
pub struct Builder {
    status: Option<Arc<StatusFn>>,
    dir: Option<PathBuf>,
    read_timeout: Duration,
    max_connections: usize,
    policy: hotpatch_loader::Policy,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("status", &self.status.is_some())
            .field("dir", &self.dir)
            .field("read_timeout", &self.read_timeout)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

impl Builder {
    /// Defaults: the standard socket directory ([`paths::socket_dir`]), a
    /// 10 s read timeout for a request line, 32 connections at a time, the
    /// loader's default policy.
    pub fn new() -> Builder {
        Builder {
            status: None,
            dir: None,
            read_timeout: Duration::from_secs(10),
            max_connections: 32,
            policy: hotpatch_loader::Policy::new(),
        }
    }

    /// What the `status` command reports for the host.
    pub fn status(mut self, f: impl Fn() -> serde_json::Value + Send + Sync + 'static) -> Self {
        self.status = Some(Arc::new(f));
        self
    }

    /// Puts the socket in `dir` instead of the standard directory (created
    /// 0700 like the standard one). Clients then need `--socket`.
    pub fn socket_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// How long a connection may take to send a whole request line,
    /// counted from the end of its previous request (idle time included):
    /// a deadline per line, not per read, so a client dripping one byte at
    /// a time is closed too.
    pub fn read_timeout(mut self, t: Duration) -> Self {
        self.read_timeout = t;
        self
    }

    /// Connections served at once. When all are open, a new one closes the
    /// connection that has waited longest for its next request line (idle
    /// or dripping); only when every one is running a request is the new
    /// one told `E_AGENT_BUSY`.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// The loader policy for `load` (e.g. an allowlist of plugin digests).
    pub fn policy(mut self, policy: hotpatch_loader::Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Trusts plugin signatures by `key` (in addition to the keys in
    /// `$XDG_CONFIG_HOME/hotpatch/trusted-keys/`, read at [`start`](Self::start)).
    pub fn trusted_key(mut self, key: hotpatch_loader::PublicKey) -> Self {
        self.policy = self.policy.trust_key(key);
        self
    }

    /// Creates the socket and starts serving on a background thread.
    ///
    /// When the policy names no host (`Policy::with_host`), the host facts
    /// come from this executable's `.hotpatch_host` section
    /// (`hotpatch_plugin_api::declare_host!`), if it has one.
    ///
    /// The keys in `$XDG_CONFIG_HOME/hotpatch/trusted-keys/` are added to the
    /// policy's trusted keys. A directory that fails the loader's ownership
    /// rules (another user could write it) contributes no key, and a warning
    /// is logged: signatures by its keys are then refused as untrusted.
    ///
    /// # Errors
    /// `E_AGENT_SOCKET` when the directory or the socket cannot be set up
    /// (e.g. the directory belongs to another user).
    pub fn start(mut self) -> Result<Agent> {
        // A host built with `declare_host!` carries its API version and
        // shared crates in `.hotpatch_host`: plugins are checked against
        // them unless the builder's policy named a host itself.
        if *self.policy.host() == hotpatch_loader::HostManifest::default() {
            match hotpatch_loader::HostManifest::from_elf("/proc/self/exe") {
                Ok(Some(m)) => self.policy = self.policy.with_host(m),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    target: hotpatch_loader::TARGET,
                    code = e.code(),
                    "ignoring this executable's .hotpatch_host: {e}"
                ),
            }
        }
        match self.policy.clone().trust_default_key_dir() {
            Ok(p) => self.policy = p,
            Err(e) => tracing::warn!(
                target: hotpatch_loader::TARGET,
                code = e.code(),
                "not trusting the keys of the trusted-keys directory: {e}"
            ),
        }
        let dir = self.dir.clone().unwrap_or_else(paths::socket_dir);
        paths::ensure_private_dir(&dir).map_err(|source| Error::Socket {
            what: "prepare the socket directory",
            path: dir.clone(),
            source,
        })?;
        let path = paths::socket_in(&dir, std::process::id());
        // A socket left by an earlier process with our pid (pid reuse, or a
        // crash of this very process image before exec) is stale.
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Socket {
                    what: "remove a stale socket",
                    path,
                    source,
                });
            }
        }
        // Bound and listening under a name no client looks for, then renamed
        // into place: a socket file at `<pid>.sock` is always one that
        // accepts (`bind` creates the file before `listen`, and a client
        // connecting in between was refused).
        let staging = dir.join(format!(".{}.sock.staging", std::process::id()));
        let _ = fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging).map_err(|source| Error::Socket {
            what: "bind",
            path: staging.clone(),
            source,
        })?;
        // The directory is 0700 already; 0600 on the socket as well, so a
        // looser directory mode later does not open it up.
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o600))
            .and_then(|()| fs::rename(&staging, &path))
            .map_err(|source| {
                let _ = fs::remove_file(&staging);
                Error::Socket {
                    what: "chmod 0600 and move into place",
                    path: path.clone(),
                    source,
                }
            })?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(0),
            control: Mutex::new(Control::new(self.policy, self.status)),
            profile: Mutex::new(()),
            uid: cred::uid(),
            read_timeout: self.read_timeout,
            max_connections: self.max_connections,
            started: Instant::now(),
        });
        // The canary watcher: promotes or rolls back canary sites by
        // itself (a tick every `CANARY_TICK`, under the control lock, never
        // on the host's call path). It holds the shared state only during
        // a tick, and ends with the agent.
        let weak = Arc::downgrade(&shared);
        let watcher = std::thread::Builder::new()
            .name("hotpatch-canary".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(crate::control::CANARY_TICK);
                    let Some(s) = weak.upgrade() else { return };
                    if s.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    s.control().canary_tick();
                }
            });
        if let Err(e) = watcher {
            tracing::warn!(error = %e, "no canary watcher thread: canaries will not be promoted or rolled back by themselves");
        }
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("hotpatch-agent".into())
            .spawn(move || accept_loop(&listener, &s))
            .map_err(|source| {
                let _ = fs::remove_file(&path);
                Error::Socket {
                    what: "spawn the agent thread for",
                    path: path.clone(),
                    source,
                }
            })?;
        Ok(Agent {
            path,
            shared,
            accept: Some(accept),
        })
    }
}

/// An open connection, as the accept loop sees it.
struct ConnSlot {
    id: u64,
    /// A handle on the socket, to shut it down when evicted.
    stream: UnixStream,
    /// Since when it waits for its current request line.
    waiting_since: Instant,
    /// Whether it is running a request (then it is never evicted).
    busy: bool,
}

pub(crate) struct Shared {
    stop: AtomicBool,
    /// The open connections. A connection evicted to make room is removed
    /// from here (and shut down); its thread then finds itself gone.
    connections: Mutex<Vec<ConnSlot>>,
    next_conn: AtomicU64,
    control: Mutex<Control>,
    /// Held while a profile is taken (one at a time; not under `control`,
    /// so other commands keep working meanwhile).
    pub(crate) profile: Mutex<()>,
    uid: u32,
    read_timeout: Duration,
    max_connections: usize,
    pub(crate) started: Instant,
}

impl Shared {
    pub(crate) fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, Vec<ConnSlot>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers connection `id`, evicting the connection that has waited
    /// longest for a request line when all `max_connections` are open.
    /// `Err(open)` when every open connection is running a request.
    fn admit(&self, id: u64, stream: UnixStream) -> std::result::Result<(), usize> {
        let mut conns = self.conns();
        if conns.len() >= self.max_connections {
            let victim = conns
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.busy)
                .min_by_key(|(_, c)| c.waiting_since)
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    let v = conns.swap_remove(i);
                    // Its blocked read returns; its thread ends.
                    let _ = v.stream.shutdown(Shutdown::Both);
                }
                None => return Err(conns.len()),
            }
        }
        conns.push(ConnSlot {
            id,
            stream,
            waiting_since: Instant::now(),
            busy: false,
        });
        Ok(())
    }

    /// Marks `id` as running a request; `false` when it was evicted (its
    /// request is then dropped unanswered: the socket is shut down).
    fn begin_request(&self, id: u64) -> bool {
        self.conns()
            .iter_mut()
            .find(|c| c.id == id)
            .map(|c| c.busy = true)
            .is_some()
    }

    /// `id` waits for its next request line from now on.
    fn end_request(&self, id: u64) {
        if let Some(c) = self.conns().iter_mut().find(|c| c.id == id) {
            c.busy = false;
            c.waiting_since = Instant::now();
        }
    }

    fn forget(&self, id: u64) {
        self.conns().retain(|c| c.id != id);
    }
}

/// A running agent. Dropping it stops serving, reverts every patch site
/// the agent installed, unloads the plugins it loaded, and removes the
/// socket file.
pub struct Agent {
    path: PathBuf,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.path)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// The socket it listens on.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop: it sees `stop` after this connection.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.path);
        self.shared.control().shutdown();
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else {
            // EMFILE and friends: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        let admitted = match conn.try_clone() {
            Ok(handle) => shared.admit(id, handle),
            Err(_) => Err(0),
        };
        if let Err(n) = admitted {
            let _ = reply_once(
                &conn,
                ErrorBody::new(
                    E_AGENT_BUSY,
                    format!("{n} connections are running requests; try again later"),
                ),
            );
            continue;
        }
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("hotpatch-agent-conn".into())
            .spawn(move || {
                serve(conn, id, &s);
                s.forget(id);
            });
        if spawned.is_err() {
            shared.forget(id);
        }
    }
}

fn reply_once(mut conn: &UnixStream, e: ErrorBody) -> io::Result<()> {
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    write_reply(&mut conn, &Reply::err(e))
}

/// How reading one request line ended.
enum Line {
    /// A complete line (newline stripped).
    Complete(Vec<u8>),
    /// Longer than the cap; its bytes were discarded up to and including the
    /// newline, so the connection can go on.
    TooLong(usize),
    /// The peer closed the connection; the bytes of an unfinished line.
    Eof(Vec<u8>),
}

/// Reads one line of at most `cap` bytes without ever buffering more than
/// `cap` (plus the reader's buffer). `before_read` runs before each read
/// (to arm the line's deadline); its error ends the line.
fn read_line(
    r: &mut impl BufRead,
    cap: usize,
    before_read: &mut impl FnMut() -> io::Result<()>,
) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut discarded = 0usize;
    loop {
        before_read()?;
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(if discarded > 0 {
                Line::TooLong(discarded)
            } else {
                Line::Eof(line)
            });
        }
        let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if discarded > 0 || line.len() + chunk.len() > cap {
            discarded += line.len() + chunk.len();
            line = Vec::new();
        } else {
            line.extend_from_slice(chunk);
        }
        let used = found.unwrap_or(buf.len());
        r.consume(used);
        if found.is_some() {
            return Ok(if discarded > 0 {
                Line::TooLong(discarded)
            } else {
                Line::Complete(line)
            });
        }
    }
}

fn serve(conn: UnixStream, id: u64, shared: &Arc<Shared>) {
    match cred::peer_cred(&conn) {
        Ok(c) if c.uid == shared.uid => {}
        Ok(c) => {
            let _ = reply_once(
                &conn,
                ErrorBody::new(
                    E_AGENT_PEER_REFUSED,
                    format!(
                        "peer pid {} runs as uid {}; this agent serves uid {} only",
                        c.pid, c.uid, shared.uid
                    ),
                ),
            );
            return;
        }
        Err(e) => {
            let _ = reply_once(
                &conn,
                ErrorBody::new(E_AGENT_PEER_REFUSED, format!("SO_PEERCRED failed: {e}")),
            );
            return;
        }
    }
    let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let timeout_handle = read_half.try_clone();
    let Ok(timeout_handle) = timeout_handle else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    let mut writer = conn;
    // The whole line (idle time before it included) must arrive by then;
    // blank lines do not extend it.
    let mut deadline = Instant::now() + shared.read_timeout;
    while !shared.stop.load(Ordering::SeqCst) {
        let mut arm = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(ErrorKind::TimedOut));
            }
            timeout_handle.set_read_timeout(Some(left))
        };
        let line = match read_line(&mut reader, protocol::MAX_LINE, &mut arm) {
            Ok(l) => l,
            // Past the line's deadline (a dripping, half-sent or idle
            // connection), evicted, or reset: close.
            Err(_) => return,
        };
        let blank = matches!(&line, Line::Complete(l) if l.iter().all(u8::is_ascii_whitespace));
        if !blank && !shared.begin_request(id) {
            // Evicted to make room while the line arrived.
            return;
        }
        let reply = match line {
            Line::Complete(l) if l.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Complete(l) => match protocol::parse_request(&l) {
                Ok(req) => {
                    // A reply that cannot be written: the client went away.
                    if dispatch(shared, req, &mut writer).is_err() {
                        return;
                    }
                    shared.end_request(id);
                    deadline = Instant::now() + shared.read_timeout;
                    continue;
                }
                Err(e) => Reply::err(e),
            },
            Line::TooLong(n) => Reply::err(ErrorBody::new(
                E_AGENT_TOO_LARGE,
                format!(
                    "request line of {n} bytes; the limit is {} bytes",
                    protocol::MAX_LINE
                ),
            )),
            Line::Eof(rest) if rest.iter().all(u8::is_ascii_whitespace) => return,
            Line::Eof(rest) => {
                let _ = write_reply(
                    &mut writer,
                    &Reply::err(ErrorBody::new(
                        E_AGENT_BAD_JSON,
                        format!(
                            "truncated request: {} byte(s) without a newline before the end of input",
                            rest.len()
                        ),
                    )),
                );
                return;
            }
        };
        if write_reply(&mut writer, &reply).is_err() {
            return;
        }
        shared.end_request(id);
        deadline = Instant::now() + shared.read_timeout;
    }
}

/// Runs one request and writes its reply (and payloads).
pub(crate) fn dispatch(shared: &Shared, req: Request, w: &mut impl Write) -> io::Result<()> {
    let reply = match req {
        Request::Profile {
            seconds,
            hz,
            top,
            flamegraph,
        } => {
            return crate::profile::run(&shared.profile, seconds, hz, top, flamegraph, w);
        }
        Request::ProfileRaw { seconds, hz } => {
            return crate::profile::run_raw(&shared.profile, seconds, hz, w);
        }
        req @ (Request::HeapStart { .. }
        | Request::HeapSnapshot
        | Request::HeapStop
        | Request::LeakCheck { .. }) => return crate::heap::run(req, w),
        Request::Stats => {
            for (target, info) in shared.control().canary_infos() {
                crate::stats::record_canary(&target, info);
            }
            Reply::typed(&crate::stats::reply()).unwrap_or_else(Reply::err)
        }
        req => {
            let op = crate::stats::SiteOp::of(&req);
            let r = shared
                .control()
                .handle(req, shared.started)
                .unwrap_or_else(Reply::err);
            if let (true, Some(v)) = (r.ok, r.result.as_ref()) {
                crate::stats::observe(op, v);
            }
            r
        }
    };
    write_reply(w, &reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], cap: usize) -> Vec<String> {
        let mut r = BufReader::with_capacity(7, input);
        let mut out = Vec::new();
        loop {
            match read_line(&mut r, cap, &mut || Ok(())).expect("read") {
                Line::Complete(l) => out.push(format!("ok:{}", String::from_utf8_lossy(&l))),
                Line::TooLong(n) => out.push(format!("long:{n}")),
                Line::Eof(rest) => {
                    out.push(format!("eof:{}", String::from_utf8_lossy(&rest)));
                    return out;
                }
            }
        }
    }

    #[test]
    fn lines_are_capped_and_resynchronized() {
        assert_eq!(
            lines(b"abc\n0123456789abcdef\nxy\npart", 10),
            ["ok:abc", "long:16", "ok:xy", "eof:part"]
        );
        assert_eq!(lines(b"0123456789\n", 10), ["ok:0123456789", "eof:"]);
        assert_eq!(lines(b"0123456789a", 10), ["long:11", "eof:"]);
    }
}
