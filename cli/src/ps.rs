//! `hotpatch ps`: running agents.

use std::io::Write;
use std::time::Duration;

use super::{Failure, Outcome, print_json};
use crate::client::Client;
use crate::paths;
use crate::protocol::{PingInfo, Request};

/// Arguments of `hotpatch ps`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also list sockets of processes that are gone (and keep them; without
    /// `--all` stale sockets of our own uid are removed).
    #[arg(long)]
    pub all: bool,
}

fn ping(socket: &std::path::Path) -> Option<PingInfo> {
    let mut c = Client::connect(socket).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    c.call_as(&Request::Ping).ok()
}

/// One agent, as `ps --json` prints it.
#[derive(Debug, serde::Serialize)]
struct Row<'a> {
    pid: u32,
    state: &'a str,
    socket: String,
    exe: Option<&'a str>,
    uptime_s: Option<f64>,
}

/// Runs `hotpatch ps`.
///
/// # Errors
/// Only when stdout fails.
pub fn run(args: &Args, out: &mut dyn Write) -> Outcome {
    let found = paths::scan();
    if !args.json {
        writeln!(
            out,
            "{:>8}  {:<8}  {:<10}  EXE / SOCKET",
            "PID", "STATE", "UPTIME"
        )
        .map_err(|e| Failure::io(&e))?;
    }
    for f in found {
        let info = if f.alive { ping(&f.socket) } else { None };
        let state = match (f.alive, &info) {
            // Not ours: never talked to, never tidied.
            _ if f.untrusted.is_some() => "untrusted",
            (true, Some(_)) => "ready",
            (true, None) => "no-answer",
            (false, _) => "stale",
        };
        if !f.alive && !args.all && f.untrusted.is_none() {
            // A socket whose process is gone (killed before it could clean
            // up). Only the owner's directory is ours to tidy.
            let _ = std::fs::remove_file(&f.socket);
            continue;
        }
        if args.json {
            let row = Row {
                pid: f.pid,
                state,
                socket: f.socket.display().to_string(),
                exe: info.as_ref().map(|i| i.exe.as_str()),
                uptime_s: info.as_ref().map(|i| i.uptime_s),
            };
            print_json(out, &row).map_err(|e| Failure::io(&e))?;
        } else {
            let exe = info.as_ref().map(|i| i.exe.clone()).unwrap_or_default();
            let up = info
                .as_ref()
                .map(|i| format!("{:.0}s", i.uptime_s))
                .unwrap_or_default();
            writeln!(out, "{:>8}  {state:<8}  {up:<10}  {exe}", f.pid)
                .map_err(|e| Failure::io(&e))?;
            writeln!(
                out,
                "{:>8}  {:<8}  {:<10}  {}",
                "",
                "",
                "",
                f.socket.display()
            )
            .map_err(|e| Failure::io(&e))?;
        }
    }
    Ok(())
}
