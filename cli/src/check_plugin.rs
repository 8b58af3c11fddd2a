//! `hotpatch check-plugin PLUGIN --exe HOST`: the plugin's requirements
//! (host-API range, shared crates) against a host executable, offline.

use std::io::Write;
use std::path::PathBuf;

use super::{Failure, Outcome};

/// Arguments of `hotpatch check-plugin`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin's `.so`.
    pub plugin: PathBuf,
    /// The host executable (its `.hotpatch_host` section, if any).
    #[arg(long)]
    pub exe: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `hotpatch check-plugin`: exit 1 with the refusal's code when the
/// host would refuse the plugin.
pub fn run(a: &Args, out: &mut dyn Write) -> Outcome {
    let r = hotpatch_loader::check_plugin(&a.plugin, &a.exe)
        .map_err(|e| Failure::new(e.code(), e.to_string(), a.json))?;
    if a.json {
        let rows: Vec<_> = r
            .table
            .rows
            .iter()
            .map(|row| {
                serde_json::json!({
                    "crate": row.name,
                    "host": row.host.as_ref().map(|h| &h.version),
                    "plugin": row.plugin.version,
                    "host_checksum": row.host.as_ref().and_then(|h| h.checksum.as_ref()),
                    "plugin_checksum": row.plugin.checksum,
                    "ok": row.agrees(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "plugin": r.name,
            "version": r.version,
            "host_api": r.host.api_version.to_string(),
            "host_declared": r.host_declared,
            "requires_host": r.requirements.as_ref().map(|q| q.host_text.clone()),
            "shared": rows,
            "verdict": r.verdict.as_ref().map_or("OK", |e| e.code()),
        });
        writeln!(out, "{v}").map_err(|e| Failure::io(&e))?;
    } else {
        write!(out, "{r}").map_err(|e| Failure::io(&e))?;
    }
    match &r.verdict {
        None => Ok(()),
        Some(e) => Err(Failure::new(e.code(), e.to_string(), false)),
    }
}
