//! The `hotpatch` command line: one module per group of subcommands, and
//! the [`client`] that finds an agent and talks to it.
//!
//! Exit codes: 0 on success; 1 when the command failed, with the stable
//! error code first on stderr (`hotpatch: E_…: message`) — and, with
//! `--json`, the error object on stdout; 2 for usage errors and offline
//! failures of `symbolize`.

pub mod attach;
pub mod check_plugin;
pub mod client;
pub mod detach;
mod error;
pub mod heap;
pub mod inspect;
pub mod keygen;
pub mod profile;
pub mod ps;
pub mod remote;
pub mod sign;
pub mod stats;
pub mod symbolize;
pub mod watch;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hotpatch_protocol::{self as protocol, Coded, paths};

pub use error::{Error, Result};

/// `hotpatch`: hot-patching and profiling for dev processes.
///
/// A process that called `hotpatch_agent::start()` (e.g. `demo-target
/// serve`) is driven through its agent socket. `--pid` picks the process
/// when several run.
#[derive(Debug, Parser)]
#[command(name = "hotpatch", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Selecting the process to talk to.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Conn {
    /// The process to talk to (default: the only running agent).
    #[arg(long)]
    pub pid: Option<u32>,
    /// The agent socket to talk to (overrides `--pid`).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List running agents (processes that can be patched).
    Ps(ps::Args),
    /// Show the process's own status (as the host reports it) and counts.
    Status(remote::Plain),
    /// Load a plugin `.so` into the process (checked before any code runs).
    Load(remote::Load),
    /// Unload a plugin loaded with `load` (refused while a site uses it).
    Unload(remote::Unload),
    /// Patch TARGET (a function of the host or of a loaded module, local
    /// symbols included) to jump to PLUGIN:SYMBOL. The replacement must
    /// have the target's signature: when DWARF describes both, the agent
    /// compares them and refuses a mismatch (E_AGENT_SIGNATURE_MISMATCH)
    /// unless --force; without DWARF it is your claim.
    Patch(remote::Patch),
    /// Point a live site at another replacement (atomic; no thread stops).
    Swap(remote::Swap),
    /// Calls run the original again; the site stays installed.
    Disable(remote::SiteArg),
    /// Calls run the replacement again.
    Enable(remote::SiteArg),
    /// Remove a site, restoring the original bytes exactly.
    Revert(remote::SiteArg),
    /// List plugins and patch sites, with their states.
    List(remote::Plain),
    /// Patchability report of a function: in the running process, or
    /// offline in a file with `--exe`.
    Inspect(inspect::Args),
    /// Sample the process for N seconds; write a gzipped pprof profile (and
    /// a flamegraph) and print the top functions.
    Profile(profile::Args),
    /// Heap profiles of the process: sampling start/stop, snapshots, diffs.
    Heap(heap::Args),
    /// Load a plugin into the process, run it, unload it, N times; report
    /// the memory it left in use.
    LeakCheck(heap::LeakCheck),
    /// Edit, save, live: rebuild the process's crate on each save and patch
    /// the changed functions into it (state kept); `--once` applies the
    /// current edit and exits, `--revert` puts the original code back.
    Watch(watch::Args),
    /// Load the agent into a running process that never linked hotpatch
    /// (ptrace + dlopen); prints its socket. Every command then works with
    /// `--pid PID`.
    Attach(attach::Attach),
    /// Stop the agent attached with `attach` (sites reverted, plugins
    /// unloaded) and unload it; reports anything that stayed.
    Detach(detach::Detach),
    /// Resolve file virtual addresses of an ELF file to functions and
    /// source lines (offline; output like `addr2line -f -C [-i]`).
    Symbolize(symbolize::Args),
    /// Make an Ed25519 key pair for signing plugins (KEY, mode 0600, and
    /// KEY.pub for the trusted-keys directory).
    Keygen(keygen::Args),
    /// Sign a plugin: writes the detached signature PLUGIN.sig.
    Sign(sign::Args),
    /// Compare a plugin's requirements (host-API range, shared crates) with
    /// a host executable, offline; exit 1 when the host would refuse it.
    CheckPlugin(check_plugin::Args),
    /// Health figures: per plugin (loads, failures by code, success rate,
    /// load-time p50/p99, state) and per patch site.
    Stats(stats::Args),
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = match cli.command {
        Command::Symbolize(args) => {
            return match symbolize::run(&args, &mut out) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("hotpatch: {e}");
                    2
                }
            };
        }
        Command::Ps(a) => ps::run(&a, &mut out),
        Command::Status(a) => remote::status(&a, &mut out),
        Command::Load(a) => remote::load(&a, &mut out),
        Command::Unload(a) => remote::unload(&a, &mut out),
        Command::Patch(a) => remote::patch(&a, &mut out),
        Command::Swap(a) => remote::swap(&a, &mut out),
        Command::Disable(a) => remote::site_cmd(&a, remote::SiteOp::Disable, &mut out),
        Command::Enable(a) => remote::site_cmd(&a, remote::SiteOp::Enable, &mut out),
        Command::Revert(a) => remote::site_cmd(&a, remote::SiteOp::Revert, &mut out),
        Command::List(a) => remote::list(&a, &mut out),
        Command::Inspect(a) => inspect::run(&a, &mut out),
        Command::Profile(a) => profile::run(&a, &mut out),
        Command::Heap(a) => heap::run(&a, &mut out),
        Command::LeakCheck(a) => heap::leak_check(&a, &mut out),
        Command::Watch(a) => watch::run(&a, &mut out),
        Command::Keygen(a) => keygen::run(&a, &mut out),
        Command::Sign(a) => sign::run(&a, &mut out),
        Command::CheckPlugin(a) => check_plugin::run(&a, &mut out),
        Command::Stats(a) => stats::run(&a, &mut out),
        Command::Attach(a) => attach::attach(&a, &mut out),
        Command::Detach(a) => detach::detach(&a, &mut out),
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            if f.json {
                let body = serde_json::json!({
                    "ok": false,
                    "error": { "code": f.code, "message": f.message },
                });
                let _ = writeln!(out, "{body}");
            }
            let _ = out.flush();
            eprintln!("hotpatch: {}: {}", f.code, f.message);
            1
        }
    }
}

/// Writes `v` as one line of JSON, keys sorted (as `serde_json::Value`
/// prints them), so `--json` output does not depend on field order.
///
/// # Errors
/// Writing fails.
pub fn print_json(out: &mut dyn Write, v: &impl serde::Serialize) -> std::io::Result<()> {
    let v = serde_json::to_value(v).map_err(std::io::Error::other)?;
    writeln!(out, "{v}")
}

/// A result with the files a command wrote (`--json` output).
#[derive(Debug, serde::Serialize)]
pub struct Written<'a, T: serde::Serialize, W: serde::Serialize> {
    /// The agent's result.
    #[serde(flatten)]
    pub result: &'a T,
    /// What was written.
    pub written: W,
}

/// A failed command: its stable code and message.
#[derive(Debug)]
pub struct Failure {
    /// The stable code.
    pub code: String,
    /// For humans.
    pub message: String,
    /// Whether to print the error as JSON on stdout too.
    pub json: bool,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: impl Into<String>, message: impl Into<String>, json: bool) -> Self {
        Failure {
            code: code.into(),
            message: message.into(),
            json,
        }
    }

    /// From any crate's error ([`Coded`]: its code, and its message, which
    /// does not contain the code).
    pub fn from_error(e: &impl Coded, json: bool) -> Self {
        let body = e.to_body();
        Failure::new(body.code, body.message, json)
    }

    /// Writing to stdout failed.
    pub fn io(e: &std::io::Error) -> Self {
        Failure::new(error::E_AGENT_IO, format!("writing the output: {e}"), false)
    }
}

/// A command's outcome.
pub type Outcome = Result<(), Failure>;
