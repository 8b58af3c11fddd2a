//! `hotpatch heap start|snapshot|stop|diff` and `hotpatch leak-check`:
//! heap profiles of a running process and plugin leak checks.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use super::remote::{Plain, call};
use super::{Conn, Failure, Outcome, Written, print_json};
use crate::client::{self, Client};
use crate::error::{E_AGENT_IO, E_AGENT_PROTOCOL};
use crate::protocol::{HeapSnapshotInfo, HeapStartInfo, HeapStopInfo, LeakCheckInfo, Request};

/// Parses a byte size: `4096`, `64KiB`, `512k`, `1MiB`, `2M`.
///
/// # Errors
/// A message when it is not a size.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512KiB, 4096)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("unknown unit {u:?} in {s:?} (B, KiB, MiB, GiB)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Arguments of `hotpatch heap`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub cmd: HeapCmd,
}

/// The `heap` subcommands.
#[derive(Debug, Subcommand)]
pub enum HeapCmd {
    /// Start allocation sampling in the process (patches the allocator's
    /// entry points).
    Start(Start),
    /// Write a gzipped pprof heap profile of what was sampled since start.
    Snapshot(Snapshot),
    /// Stop sampling; the allocator's entry points are restored.
    Stop(Plain),
    /// In-use growth by stack between two heap profiles (offline).
    Diff(Diff),
}

/// Arguments of `heap start`.
#[derive(Debug, clap::Args)]
pub struct Start {
    /// Mean bytes allocated between samples.
    #[arg(long, default_value = "512KiB", value_parser = parse_size)]
    pub rate: u64,
    #[command(flatten)]
    conn: Conn,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `heap snapshot`.
#[derive(Debug, clap::Args)]
pub struct Snapshot {
    /// Where to write the profile (`go tool pprof` reads it).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        default_value = "heap.pb.gz"
    )]
    pub output: PathBuf,
    #[command(flatten)]
    conn: Conn,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `heap diff`.
#[derive(Debug, clap::Args)]
pub struct Diff {
    /// The earlier profile.
    pub before: PathBuf,
    /// The later profile.
    pub after: PathBuf,
    /// Stacks shown.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Print the rows as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hotpatch leak-check`.
#[derive(Debug, clap::Args)]
pub struct LeakCheck {
    /// The plugin `.so` (loaded into the process, run, unloaded).
    pub plugin: PathBuf,
    /// Load/run/unload cycles.
    #[arg(long, default_value_t = 1)]
    pub cycles: u32,
    /// An `extern "C" fn()` of the plugin to call after `on_init`.
    #[arg(long, value_name = "SYMBOL")]
    pub entry: Option<String>,
    /// How many times to call `--entry` per cycle.
    #[arg(long, default_value_t = 1, requires = "entry")]
    pub calls: u32,
    /// Sampling rate when no heap session is running (a running session
    /// keeps its own).
    #[arg(long, default_value = "16KiB", value_parser = parse_size)]
    pub rate: u64,
    #[command(flatten)]
    conn: Conn,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `hotpatch heap …`.
///
/// # Errors
/// The agent's and the heap profiler's codes (`E_HEAP_*`).
pub fn run(a: &Args, out: &mut dyn Write) -> Outcome {
    match &a.cmd {
        HeapCmd::Start(s) => {
            let v: HeapStartInfo =
                call(&s.conn, s.json, &Request::HeapStart { rate: Some(s.rate) })?;
            let r = if s.json {
                print_json(out, &v)
            } else {
                writeln!(
                    out,
                    "heap sampling started: 1 sample per {} bytes on average, allocator {}",
                    v.rate, v.allocator
                )
            };
            r.map_err(|e| Failure::io(&e))
        }
        HeapCmd::Stop(p) => {
            let v: HeapStopInfo = call(&p.conn, p.json, &Request::HeapStop)?;
            let r = if p.json {
                print_json(out, &v)
            } else {
                writeln!(
                    out,
                    "heap sampling stopped ({} samples); allocator entry points restored",
                    v.stats.samples
                )
            };
            r.map_err(|e| Failure::io(&e))
        }
        HeapCmd::Snapshot(s) => snapshot(s, out),
        HeapCmd::Diff(d) => diff(d, out),
    }
}

fn snapshot(a: &Snapshot, out: &mut dyn Write) -> Outcome {
    let fail = |e: &crate::Error| Failure::from_error(e, a.json);
    let socket = client::locate(a.conn.pid, a.conn.socket.as_deref()).map_err(|e| fail(&e))?;
    let mut c = Client::connect(&socket).map_err(|e| fail(&e))?;
    c.set_read_timeout(Some(Duration::from_secs(300)))
        .map_err(|e| fail(&e))?;
    let reply = c.request(&Request::HeapSnapshot).map_err(|e| fail(&e))?;
    let v: HeapSnapshotInfo = client::into_typed(reply).map_err(|e| fail(&e))?;
    let bodies = c.read_payloads(&v.payloads).map_err(|e| fail(&e))?;
    let body = bodies
        .first()
        .ok_or_else(|| Failure::new(E_AGENT_PROTOCOL, "no profile payload", a.json))?;
    std::fs::write(&a.output, body).map_err(|e| {
        Failure::new(
            E_AGENT_IO,
            format!("writing {}: {e}", a.output.display()),
            a.json,
        )
    })?;
    let r = if a.json {
        print_json(
            out,
            &Written {
                result: &v,
                written: a.output.display().to_string(),
            },
        )
    } else {
        let sd = v
            .inuse_space_sd
            .map(|sd| format!(" (±{sd:.0} bytes, 1 sd of sampling error)"))
            .unwrap_or_default();
        writeln!(
            out,
            "in use: {} bytes{sd} in {} objects; allocated: {} bytes in {} objects (estimates, 1 sample per {} B)\nwrote {}",
            v.inuse_space,
            v.inuse_objects,
            v.alloc_space,
            v.alloc_objects,
            v.rate,
            a.output.display()
        )
    };
    r.map_err(|e| Failure::io(&e))
}

fn diff(a: &Diff, out: &mut dyn Write) -> Outcome {
    let read = |p: &PathBuf| {
        hotpatch_heap::read_heap_profile(p).map_err(|e| Failure::from_error(&e, a.json))
    };
    let before = read(&a.before)?;
    let after = read(&a.after)?;
    let rows = hotpatch_heap::diff_profiles(&before, &after);
    let total: i64 = rows.iter().map(|r| r.inuse_space).sum();
    let r = if a.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "inuse_space": total, "stacks": rows })
        )
    } else {
        (|| {
            writeln!(out, "in-use growth: {total} bytes")?;
            writeln!(
                out,
                "{:>14} {:>10}  {:<40} stack (innermost first)",
                "bytes", "objects", "module"
            )?;
            for r in rows.iter().take(a.top) {
                let module = std::path::Path::new(&r.module)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                writeln!(
                    out,
                    "{:>14} {:>10}  {:<40} {}",
                    r.inuse_space,
                    r.inuse_objects,
                    module,
                    r.stack
                        .iter()
                        .take(6)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" < ")
                )?;
            }
            Ok(())
        })()
    };
    r.map_err(|e: std::io::Error| Failure::io(&e))
}

/// Runs `hotpatch leak-check`.
///
/// # Errors
/// The agent's and the heap profiler's codes (`E_HEAP_*`, the loader's).
pub fn leak_check(a: &LeakCheck, out: &mut dyn Write) -> Outcome {
    let fail = |e: &crate::Error| Failure::from_error(e, a.json);
    let path = std::path::absolute(&a.plugin).unwrap_or_else(|_| a.plugin.clone());
    let socket = client::locate(a.conn.pid, a.conn.socket.as_deref()).map_err(|e| fail(&e))?;
    let mut c = Client::connect(&socket).map_err(|e| fail(&e))?;
    c.set_read_timeout(Some(Duration::from_secs(3600)))
        .map_err(|e| fail(&e))?;
    let v: LeakCheckInfo = c
        .call_as(&Request::LeakCheck {
            path: path.display().to_string(),
            cycles: a.cycles,
            entry: a.entry.clone(),
            calls: a.entry.as_ref().map(|_| a.calls),
            rate: Some(a.rate),
        })
        .map_err(|e| fail(&e))?;
    let r = if a.json {
        print_json(out, &v)
    } else {
        write!(out, "{}", v.table)
    };
    r.map_err(|e| Failure::io(&e))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("64k"), Ok(64 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
