//! `hotpatch stats [--json | --prometheus]`: health figures of the
//! process's plugins and patch sites.

use std::io::Write;

use crate::protocol::Request;

use super::{Conn, Failure, Outcome};

/// Arguments of `hotpatch stats`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    /// Print the figures as JSON.
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,
    /// Print the figures in the Prometheus text exposition format.
    #[arg(long)]
    pub prometheus: bool,
}

/// Runs `hotpatch stats`.
pub fn run(a: &Args, out: &mut dyn Write) -> Outcome {
    let v: serde_json::Value = super::remote::call(&a.conn, a.json, &Request::Stats)?;
    let io = |e: std::io::Error| Failure::io(&e);
    if a.prometheus {
        return write!(out, "{}", v["prometheus"].as_str().unwrap_or("")).map_err(io);
    }
    if a.json {
        let mut v = v;
        if let Some(o) = v.as_object_mut() {
            o.remove("prometheus");
        }
        return writeln!(out, "{v}").map_err(io);
    }
    writeln!(out, "plugins:").map_err(io)?;
    for p in v["plugins"].as_array().into_iter().flatten() {
        let fails: Vec<String> = p["failures"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(c, n)| format!("{c}={n}"))
            .collect();
        let ms = |k: &str| {
            p[k].as_f64()
                .map_or("-".to_owned(), |s| format!("{:.2} ms", s * 1e3))
        };
        writeln!(
            out,
            "  {} [{}] loads {} failures {} success {} load p50 {} p99 {}  {}",
            p["name"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            p["loads"],
            if fails.is_empty() {
                "0".to_owned()
            } else {
                fails.join(",")
            },
            p["success_rate"]
                .as_f64()
                .map_or("-".to_owned(), |r| format!("{:.1}%", r * 100.0)),
            ms("load_seconds_p50"),
            ms("load_seconds_p99"),
            p["path"].as_str().unwrap_or(""),
        )
        .map_err(io)?;
    }
    writeln!(out, "sites:").map_err(io)?;
    for s in v["sites"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  #{} {} [{}] -> {}  installs {} swaps {} enables {} disables {} reverts {} enabled {:.1} s",
            s["id"],
            s["target"].as_str().unwrap_or("?"),
            s["state"].as_str().unwrap_or("?"),
            s["with"].as_str().unwrap_or("?"),
            s["installs"],
            s["swaps"],
            s["enables"],
            s["disables"],
            s["reverts"],
            s["enabled_seconds"].as_f64().unwrap_or(0.0),
        )
        .map_err(io)?;
        if let Ok(c) = serde_json::from_value::<crate::protocol::CanaryInfo>(s["canary"].clone()) {
            writeln!(
                out,
                "    canary {} [{}] replacement calls {} panics {} errors {}, current code calls {} errors {}{}",
                c.ratio,
                c.state,
                c.calls,
                c.panics,
                c.errors,
                c.control_calls,
                c.control_errors,
                c.reason.map(|r| format!("; rolled back: {r}")).unwrap_or_default(),
            )
            .map_err(io)?;
        }
    }
    Ok(())
}
