//! The commands that talk to a running agent: `status`, `load`, `unload`,
//! `patch`, `swap`, `disable`, `enable`, `revert`, `list`.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Conn, Failure, Outcome, print_json};
use crate::client::{self, Client};
use crate::protocol::{
    CanaryInfo, ListInfo, PluginInfo, Request, SignatureCheck, SiteInfo, StatusInfo, UnloadInfo,
};

/// Connects as `conn` says, runs one request and reads its result as `T`
/// (the request's result type, [`crate::protocol::reply`]).
///
/// # Errors
/// Locating or connecting fails, the agent replies with an error, or the
/// result is not a `T` (`E_AGENT_PROTOCOL`).
pub fn call<T: DeserializeOwned>(conn: &Conn, json: bool, req: &Request) -> Result<T, Failure> {
    let socket = client::locate(conn.pid, conn.socket.as_deref())
        .map_err(|e| Failure::from_error(&e, json))?;
    let mut c = Client::connect(&socket).map_err(|e| Failure::from_error(&e, json))?;
    c.call_as(req).map_err(|e| Failure::from_error(&e, json))
}

fn emit<T: Serialize>(
    out: &mut dyn Write,
    json: bool,
    v: &T,
    human: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Outcome {
    let r = if json { print_json(out, v) } else { human(out) };
    r.map_err(|e| Failure::io(&e))
}

/// Arguments of commands without their own (`status`, `list`, `heap stop`).
#[derive(Debug, clap::Args)]
pub struct Plain {
    #[command(flatten)]
    pub(crate) conn: Conn,
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
    /// The replacement, the override, the connection.
    #[command(flatten)]
    pub replacement: Replacement,
    /// A canary: M in N calls go to the replacement, the rest to the
    /// current code (e.g. `1/10`); the agent promotes it or rolls it back
    /// by itself.
    #[arg(long, value_name = "M/N")]
    pub canary: Option<String>,
    /// With --canary: promote (every call to the replacement) after this
    /// clean window, e.g. `30s`, `500ms`, `2m` (default 30s).
    #[arg(long, value_name = "DURATION", requires = "canary")]
    pub promote_after: Option<String>,
    /// With --canary: roll back by itself on `panic` (a caught panic of the
    /// replacement) and/or `errors>P%` (its error rate exceeds the current
    /// code's by P points); comma-separated. Default: `panic` when the
    /// replacement has canary counters.
    #[arg(long, value_name = "RULES", requires = "canary")]
    pub rollback_on: Option<String>,
}

/// `30s`, `500ms`, `2m`, `1.5` (seconds) as seconds.
fn seconds(s: &str, json: bool) -> Result<f64, Failure> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| v * mult)
        .ok_or_else(|| {
            Failure::new(
                crate::protocol::E_AGENT_CANARY_BAD_RULE,
                format!("--promote-after {s:?}: not a positive duration (30s, 500ms, 2m)"),
                json,
            )
        })
}

/// The replacement of `patch` and `swap`, whether to override the
/// signature check, and the options every remote command has.
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
    #[command(flatten)]
    conn: Conn,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hotpatch swap`.
#[derive(Debug, clap::Args)]
pub struct Swap {
    /// The site: its name (the target as given to `patch`) or `#ID`.
    pub site: String,
    /// The replacement, the override, the connection.
    #[command(flatten)]
    pub replacement: Replacement,
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

/// A canary's state and figures, one indented line (`patch`, `list`,
/// `stats`).
pub(crate) fn canary_line(out: &mut dyn Write, c: &CanaryInfo) -> std::io::Result<()> {
    write!(
        out,
        "    canary {} {}: {} replacement calls, {} panics, {} errors (current code: {} calls, {} errors), {:.1}s",
        c.ratio, c.state, c.calls, c.panics, c.errors, c.control_calls, c.control_errors, c.since_s
    )?;
    match &c.reason {
        Some(r) => writeln!(out, "; rolled back: {r}"),
        None => writeln!(out),
    }
}

fn site_line(out: &mut dyn Write, v: &SiteInfo) -> std::io::Result<()> {
    writeln!(
        out,
        "site #{} {}: {} @{} -> {} @{}  [{}]",
        v.id, v.name, v.target, v.target_addr, v.with, v.with_addr, v.state
    )?;
    if let Some(c) = &v.canary {
        canary_line(out, c)?;
    }
    Ok(())
}

/// What the agent said about the two signatures.
fn signature_line(out: &mut dyn Write, v: &SiteInfo) -> std::io::Result<()> {
    let Some(sig) = &v.signature else {
        return Ok(());
    };
    let SignatureCheck {
        checked,
        why,
        forced_over,
    } = sig;
    if !checked {
        writeln!(
            out,
            "  signature not checked: {}",
            why.as_deref().unwrap_or("?")
        )?;
    } else if let Some(m) = forced_over.as_ref().filter(|m| !m.is_empty()) {
        for x in m {
            writeln!(out, "  forced over a signature mismatch: {x}")?;
        }
    } else {
        writeln!(out, "  signature checked against DWARF: compatible")?;
    }
    Ok(())
}

/// `hotpatch status`.
///
/// # Errors
/// See [`call`].
pub fn status(a: &Plain, out: &mut dyn Write) -> Outcome {
    let v: StatusInfo = call(&a.conn, a.json, &Request::Status)?;
    emit(out, a.json, &v, |o| {
        writeln!(
            o,
            "pid {}: {} plugin(s), {} site(s)",
            v.pid, v.plugins, v.sites
        )?;
        writeln!(
            o,
            "host: {}",
            serde_json::to_string_pretty(&v.host).unwrap_or_default()
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
    let v: PluginInfo = call(
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
            v.name,
            v.version,
            v.path,
            v.base,
            if v.tls { ", has TLS" } else { "" }
        )
    })
}

/// `hotpatch unload`.
///
/// # Errors
/// See [`call`]; `E_PLG_IN_USE` while a site uses the plugin.
pub fn unload(a: &Unload, out: &mut dyn Write) -> Outcome {
    let v: UnloadInfo = call(
        &a.conn,
        a.json,
        &Request::Unload {
            name: a.name.clone(),
        },
    )?;
    emit(out, a.json, &v, |o| {
        write!(o, "unloaded {}: {}", v.name, v.outcome)?;
        match &v.reason {
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
    let json = a.replacement.json;
    let req = Request::Patch {
        target: a.target.clone(),
        with: a.replacement.with.clone(),
        force: a.replacement.force,
        canary: a.canary.clone(),
        promote_after: a
            .promote_after
            .as_deref()
            .map(|p| seconds(p, json))
            .transpose()?,
        rollback_on: a.rollback_on.clone(),
    };
    replace(&a.replacement, &req, out)
}

/// `hotpatch swap`.
///
/// # Errors
/// See [`call`].
pub fn swap(a: &Swap, out: &mut dyn Write) -> Outcome {
    let req = Request::Swap {
        site: a.site.clone(),
        with: a.replacement.with.clone(),
        force: a.replacement.force,
    };
    replace(&a.replacement, &req, out)
}

/// `patch` and `swap` after their request is built: the site and what the
/// signature check found.
fn replace(r: &Replacement, req: &Request, out: &mut dyn Write) -> Outcome {
    let v: SiteInfo = call(&r.conn, r.json, req)?;
    emit(out, r.json, &v, |o| {
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
    let v: SiteInfo = call(&a.conn, a.json, &req)?;
    emit(out, a.json, &v, |o| site_line(o, &v))
}

/// `hotpatch list`.
///
/// # Errors
/// See [`call`].
pub fn list(a: &Plain, out: &mut dyn Write) -> Outcome {
    let v: ListInfo = call(&a.conn, a.json, &Request::List)?;
    emit(out, a.json, &v, |o| {
        writeln!(o, "plugins ({}):", v.plugins.len())?;
        for p in &v.plugins {
            writeln!(
                o,
                "  {:<16} {:<8} pins {}  {}",
                p.name, p.version, p.pins, p.path
            )?;
        }
        writeln!(o, "sites ({}):", v.sites.len())?;
        for site in &v.sites {
            write!(o, "  ")?;
            site_line(o, site)?;
        }
        Ok(())
    })
}
