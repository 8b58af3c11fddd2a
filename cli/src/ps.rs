//! `hotpatch ps`: running agents.

use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Failure, Outcome};
use crate::client::Client;
use crate::paths;
use crate::protocol::Request;

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

fn ping(socket: &std::path::Path) -> Option<Value> {
    let mut c = Client::connect(socket).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    c.call(&Request::Ping).ok()
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
            let v = json!({
                "pid": f.pid,
                "state": state,
                "socket": f.socket.display().to_string(),
                "exe": info.as_ref().map(|i| i["exe"].clone()),
                "uptime_s": info.as_ref().map(|i| i["uptime_s"].clone()),
            });
            writeln!(out, "{v}").map_err(|e| Failure::io(&e))?;
        } else {
            let exe = info
                .as_ref()
                .and_then(|i| i["exe"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let up = info
                .as_ref()
                .and_then(|i| i["uptime_s"].as_f64())
                .map(|s| format!("{s:.0}s"))
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
