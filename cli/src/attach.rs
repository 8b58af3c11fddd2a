//! `hotpatch attach PID`: load the agent into a process that never linked
//! hotpatch (`hotpatch-inject`); `hotpatch detach PID` ([`super::detach`])
//! takes it out again.
//!
//! `attach` records what the process looked like before (open file
//! descriptors, caught and ignored signals) in `<socket dir>/<pid>.attach`;
//! `detach` compares and reports anything that stayed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Failure, Outcome};
use crate::client::Client;
use crate::protocol::Request;

/// Arguments of `hotpatch attach`.
#[derive(Debug, clap::Args)]
pub struct Attach {
    /// The process to attach to (same uid).
    pub pid: u32,
    /// The agent's shared object (default: `libhotpatch_agent_so.so` next to
    /// this executable, or `$HOTPATCH_AGENT_SO`).
    #[arg(long, value_name = "PATH")]
    pub agent_so: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn agent_so(given: Option<&Path>) -> PathBuf {
    given.map_or_else(
        || {
            let exe = std::env::current_exe().unwrap_or_default();
            hotpatch_inject::default_agent_so(&exe)
        },
        Path::to_path_buf,
    )
}

pub(crate) fn fail(e: &hotpatch_inject::Error, json: bool) -> Failure {
    Failure::new(e.code(), e.message.clone(), json)
}

/// What `detach` compares: fds and signal dispositions.
pub(crate) fn snapshot(pid: i32) -> Value {
    let fds: Vec<String> = hotpatch_sys::tracee::fds(pid)
        .unwrap_or_default()
        .into_iter()
        .map(|(fd, to)| format!("{fd} -> {}", to.display()))
        .collect();
    let field = |k: &str| {
        hotpatch_sys::tracee::status_field(pid, k)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    json!({ "fds": fds, "SigCgt": field("SigCgt"), "SigIgn": field("SigIgn") })
}

pub(crate) fn record_path(pid: i32) -> PathBuf {
    hotpatch_inject::target_socket_dir(pid).join(format!("{pid}.attach"))
}

/// Runs `hotpatch attach`.
///
/// # Errors
/// The `E_ATTACH_*` refusals and failures; `E_AGENT_*` when the agent does
/// not answer.
pub fn attach(args: &Attach, out: &mut dyn Write) -> Outcome {
    let pid = i32::try_from(args.pid).unwrap_or(-1);
    let so = agent_so(args.agent_so.as_deref());
    let before = snapshot(pid);
    let t0 = Instant::now();
    let a = hotpatch_inject::attach(pid, &so, Duration::from_secs(10))
        .map_err(|e| fail(&e, args.json))?;
    let mut c = Client::connect(&a.socket).map_err(|e| Failure::from_error(&e, args.json))?;
    c.call(&Request::Status)
        .map_err(|e| Failure::from_error(&e, args.json))?;
    let served = t0.elapsed();
    let _ = std::fs::write(record_path(pid), before.to_string());
    let v = json!({
        "pid": pid,
        "socket": a.socket.display().to_string(),
        "thread": a.tid,
        "paused_us": a.paused.as_micros() as u64,
        "status_served_us": served.as_micros() as u64,
        "retries": a.retries,
    });
    let r = if args.json {
        writeln!(out, "{v}")
    } else {
        writeln!(
            out,
            "attached to {pid}: {}\n(thread {} paused {:.2} ms, the others not stopped; \
             status served {:.1} ms after the start)",
            a.socket.display(),
            a.tid,
            a.paused.as_secs_f64() * 1e3,
            served.as_secs_f64() * 1e3
        )
    };
    r.map_err(|e| Failure::io(&e))
}
