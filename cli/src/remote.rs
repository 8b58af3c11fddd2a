//! The commands that talk to a running agent: `status`, `load`, `unload`,
//! `patch`, `swap`, `disable`, `enable`, `revert`, `list`.

use std::io::Write;
use std::path::PathBuf;

use serde_json::Value;

use super::{Conn, Failure, Outcome};
use crate::client::{self, Client};
use crate::protocol::Request;

/// Connects as `conn` says and runs one request.
///
/// # Errors
/// Locating or connecting fails, or the agent replies with an error.
pub fn call(conn: &Conn, json: bool, req: &Request) -> Result<Value, Failure> {
    let socket = client::locate(conn.pid, conn.socket.as_deref())
        .map_err(|e| Failure::from_error(&e, json))?;
    let mut c = Client::connect(&socket).map_err(|e| Failure::from_error(&e, json))?;
    c.call(req).map_err(|e| Failure::from_error(&e, json))
}

fn emit(
    out: &mut dyn Write,
    json: bool,
    v: &Value,
    human: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Outcome {
    let r = if json {
        writeln!(out, "{v}")
    } else {
        human(out)
    };
    r.map_err(|e| Failure::io(&e))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// Arguments of commands without their own (`status`, `list`).
#[derive(Debug, clap::Args)]
pub struct Plain {
    #[command(flatten)]
    conn: Conn,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hotpatch load`.
#[derive(Debug, clap::Args)]
pub struct Load {
    /// The plugin's `.so` (resolved against this shell's directory).
    pub path: PathBuf,
    #[command(flatten)]
    conn: Conn,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hotpatch unload`.
#[derive(Debug, clap::Args)]
pub struct Unload {
    /// The plugin's name (as `list` shows it, e.g. `pricing-v1`).
    pub name: String,
    #[command(flatten)]
    conn: Conn,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hotpatch patch`.
#[derive(Debug, clap::Args)]
pub struct Patch {
    /// The function to patch: `SYMBOL` (searched in the host, then in the
    /// plugins, then in every mapped library) or `MODULE:SYMBOL`. Rust paths
    /// work (`demo_target::pricing::apply_tax`), local symbols included.
    pub target: String,
    /// The replacement and the override.
    #[command(flatten)]
    pub replacement: Replacement,
    #[command(flatten)]
    conn: Conn,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The replacement of `patch` and `swap`, and whether to override the
/// signature check.
#[derive(Debug, clap::Args)]
pub struct Replacement {
    /// The replacement: `PLUGIN:SYMBOL` of a plugin loaded with `load`.
    #[arg(long = "with", value_name = "PLUGIN:SYMBOL")]
    pub with: String,
    /// Go ahead even if DWARF shows the replacement takes or returns its
    /// values differently (refused with E_AGENT_SIGNATURE_MISMATCH
    /// otherwise). Without DWARF for either side nothing is checked.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `hotpatch swap`.
#[derive(Debug, clap::Args)]
pub struct Swap {
    /// The site: its name (the target as given to `patch`) or `#ID`.
    pub site: String,
    /// The replacement and the override.
    #[command(flatten)]
    pub replacement: Replacement,
    #[command(flatten)]
    conn: Conn,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hotpatch disable|enable|revert`.
#[derive(Debug, clap::Args)]
pub struct SiteArg {
    /// The site: its name (the target as given to `patch`) or `#ID`.
    pub site: String,
    #[command(flatten)]
    conn: Conn,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Which site operation.
#[derive(Debug, Clone, Copy)]
pub enum SiteOp {
    /// `disable`.
    Disable,
    /// `enable`.
    Enable,
    /// `revert`.
    Revert,
}

fn site_line(out: &mut dyn Write, v: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "site #{} {}: {} @{} -> {} @{}  [{}]",
        v["id"],
        s(&v["name"]),
        s(&v["target"]),
        s(&v["target_addr"]),
        s(&v["with"]),
        s(&v["with_addr"]),
        s(&v["state"])
    )
}

/// What the agent said about the two signatures.
fn signature_line(out: &mut dyn Write, v: &Value) -> std::io::Result<()> {
    let sig = &v["signature"];
    if sig["checked"] == Value::Bool(false) {
        writeln!(out, "  signature not checked: {}", s(&sig["why"]))?;
    } else if let Some(m) = sig["forced_over"].as_array().filter(|m| !m.is_empty()) {
        for x in m {
            writeln!(out, "  forced over a signature mismatch: {}", s(x))?;
        }
    } else if sig["checked"] == Value::Bool(true) {
        writeln!(out, "  signature checked against DWARF: compatible")?;
    }
    Ok(())
}

/// `hotpatch status`.
///
/// # Errors
/// See [`call`].
pub fn status(a: &Plain, out: &mut dyn Write) -> Outcome {
    let v = call(&a.conn, a.json, &Request::Status)?;
    emit(out, a.json, &v, |o| {
        writeln!(
            o,
            "pid {}: {} plugin(s), {} site(s)",
            v["pid"], v["plugins"], v["sites"]
        )?;
        writeln!(
            o,
            "host: {}",
            serde_json::to_string_pretty(&v["host"]).unwrap_or_default()
        )
    })
}

/// `hotpatch load`.
///
/// # Errors
/// See [`call`]; the loader's `E_PLG_*` codes.
pub fn load(a: &Load, out: &mut dyn Write) -> Outcome {
    // The host's working directory is not ours: send an absolute path.
    let path = std::path::absolute(&a.path).unwrap_or_else(|_| a.path.clone());
    let v = call(
        &a.conn,
        a.json,
        &Request::Load {
            path: path.display().to_string(),
        },
    )?;
    emit(out, a.json, &v, |o| {
        writeln!(
            o,
            "loaded {} {} from {} (base {}{})",
            s(&v["name"]),
            s(&v["version"]),
            s(&v["path"]),
            s(&v["base"]),
            if v["tls"] == true { ", has TLS" } else { "" }
        )
    })
}

/// `hotpatch unload`.
///
/// # Errors
/// See [`call`]; `E_PLG_IN_USE` while a site uses the plugin.
pub fn unload(a: &Unload, out: &mut dyn Write) -> Outcome {
    let v = call(
        &a.conn,
        a.json,
        &Request::Unload {
            name: a.name.clone(),
        },
    )?;
    emit(out, a.json, &v, |o| {
        write!(o, "unloaded {}: {}", s(&v["name"]), s(&v["outcome"]))?;
        match v["reason"].as_str() {
            Some(r) => writeln!(o, " ({r})"),
            None => writeln!(o),
        }
    })
}

/// `hotpatch patch`.
///
/// # Errors
/// See [`call`]; the patcher's refusals (`E_PATCH_BACK_JUMP`, …), the
/// symbolizer's `E_SYM_SYMBOL_NOT_FOUND`.
pub fn patch(a: &Patch, out: &mut dyn Write) -> Outcome {
    let v = call(
        &a.conn,
        a.json,
        &Request::Patch {
            target: a.target.clone(),
            with: a.replacement.with.clone(),
            force: a.replacement.force,
        },
    )?;
    emit(out, a.json, &v, |o| {
        site_line(o, &v)?;
        signature_line(o, &v)
    })
}

/// `hotpatch swap`.
///
/// # Errors
/// See [`call`].
pub fn swap(a: &Swap, out: &mut dyn Write) -> Outcome {
    let v = call(
        &a.conn,
        a.json,
        &Request::Swap {
            site: a.site.clone(),
            with: a.replacement.with.clone(),
            force: a.replacement.force,
        },
    )?;
    emit(out, a.json, &v, |o| {
        site_line(o, &v)?;
        signature_line(o, &v)
    })
}

/// `hotpatch disable|enable|revert`.
///
/// # Errors
/// See [`call`]; `E_AGENT_NO_SUCH_SITE`.
pub fn site_cmd(a: &SiteArg, op: SiteOp, out: &mut dyn Write) -> Outcome {
    let site = a.site.clone();
    let req = match op {
        SiteOp::Disable => Request::Disable { site },
        SiteOp::Enable => Request::Enable { site },
        SiteOp::Revert => Request::Revert { site },
    };
    let v = call(&a.conn, a.json, &req)?;
    emit(out, a.json, &v, |o| site_line(o, &v))
}

/// `hotpatch list`.
///
/// # Errors
/// See [`call`].
pub fn list(a: &Plain, out: &mut dyn Write) -> Outcome {
    let v = call(&a.conn, a.json, &Request::List)?;
    emit(out, a.json, &v, |o| {
        let empty = Vec::new();
        let plugins = v["plugins"].as_array().unwrap_or(&empty);
        writeln!(o, "plugins ({}):", plugins.len())?;
        for p in plugins {
            writeln!(
                o,
                "  {:<16} {:<8} pins {}  {}",
                s(&p["name"]),
                s(&p["version"]),
                p["pins"],
                s(&p["path"])
            )?;
        }
        let sites = v["sites"].as_array().unwrap_or(&empty);
        writeln!(o, "sites ({}):", sites.len())?;
        for site in sites {
            write!(o, "  ")?;
            site_line(o, site)?;
        }
        Ok(())
    })
}
