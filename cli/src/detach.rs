//! `hotpatch detach PID`: stop the agent `hotpatch attach` loaded (every
//! site reverted, plugins unloaded, threads stopped, socket removed, signal
//! dispositions put back), unload it, and report what stayed compared with
//! the state recorded at attach.

use std::io::Write;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::attach::{agent_so, fail, record_path, snapshot};
use super::{Failure, Outcome};

/// Arguments of `hotpatch detach`.
#[derive(Debug, clap::Args)]
pub struct Detach {
    /// The process to detach from.
    pub pid: u32,
    /// The agent's shared object, as given to `attach`.
    #[arg(long, value_name = "PATH")]
    pub agent_so: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `hotpatch detach`.
///
/// # Errors
/// The `E_ATTACH_*` refusals and failures.
pub fn detach(args: &Detach, out: &mut dyn Write) -> Outcome {
    let pid = i32::try_from(args.pid).unwrap_or(-1);
    let so = agent_so(args.agent_so.as_deref());
    let d = hotpatch_inject::detach(pid, &so).map_err(|e| fail(&e, args.json))?;
    let record = record_path(pid);
    let before: Option<Value> = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let _ = std::fs::remove_file(&record);
    let after = snapshot(pid);
    let mut stayed: Vec<String> = Vec::new();
    if !d.unmapped {
        stayed.push("the agent's code stays mapped (the dynamic loader kept it)".into());
    }
    stayed.extend(d.left.iter().map(|m| format!("mapping {m}")));
    match &before {
        Some(b) => {
            for key in ["SigCgt", "SigIgn"] {
                if b[key] != after[key] {
                    stayed.push(format!("{key} was {} and is {}", b[key], after[key]));
                }
            }
            let list = |v: &Value| -> Vec<String> {
                v["fds"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let (b, a) = (list(b), list(&after));
            for fd in a.iter().filter(|f| !b.contains(f)) {
                stayed.push(format!("fd {fd} (new since attach)"));
            }
            for fd in b.iter().filter(|f| !a.contains(f)) {
                stayed.push(format!("fd {fd} closed since attach (by the host?)"));
            }
        }
        None => stayed.push("no record of the state before attach to compare with".into()),
    }
    let v = json!({
        "pid": pid,
        "thread": d.tid,
        "paused_us": d.paused.as_micros() as u64,
        "unmapped": d.unmapped,
        "stayed": stayed,
    });
    let r = if args.json {
        writeln!(out, "{v}")
    } else {
        let mut s = format!(
            "detached from {pid}: sites reverted, plugins unloaded, agent stopped and {} \
             (thread {} paused {:.2} ms)\n",
            if d.unmapped {
                "unloaded"
            } else {
                "still mapped"
            },
            d.tid,
            d.paused.as_secs_f64() * 1e3
        );
        if stayed.is_empty() {
            s.push_str(
                "nothing stayed: file descriptors and signal dispositions as before attach\n",
            );
        } else {
            for x in &stayed {
                s.push_str(&format!("stayed: {x}\n"));
            }
        }
        write!(out, "{s}")
    };
    r.map_err(|e| Failure::io(&e))
}
