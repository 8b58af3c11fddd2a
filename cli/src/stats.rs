//! `hotpatch stats [--json | --prometheus]`: health figures of the
//! process's plugins and patch sites.

use std::io::Write;

use crate::protocol::{Request, StatsReport};

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
    let v: StatsReport = super::remote::call(&a.conn, a.json, &Request::Stats)?;
    let io = |e: std::io::Error| Failure::io(&e);
    if a.prometheus {
        return write!(out, "{}", v.prometheus).map_err(io);
    }
    if a.json {
        let mut j = serde_json::to_value(&v).map_err(|e| Failure::io(&std::io::Error::other(e)))?;
        if let Some(o) = j.as_object_mut() {
            o.remove("prometheus");
        }
        return writeln!(out, "{j}").map_err(io);
    }
    writeln!(out, "plugins:").map_err(io)?;
    for p in &v.plugins {
        let fails: Vec<String> = p.failures.iter().map(|(c, n)| format!("{c}={n}")).collect();
        let ms = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{:.2} ms", s * 1e3));
        writeln!(
            out,
            "  {} [{}] loads {} failures {} success {} load p50 {} p99 {}  {}",
            p.name,
            p.state,
            p.loads,
            if fails.is_empty() {
                "0".to_owned()
            } else {
                fails.join(",")
            },
            p.success_rate
                .map_or("-".to_owned(), |r| format!("{:.1}%", r * 100.0)),
            ms(p.load_seconds_p50),
            ms(p.load_seconds_p99),
            p.path,
        )
        .map_err(io)?;
    }
    writeln!(out, "sites:").map_err(io)?;
    for s in &v.sites {
        writeln!(
            out,
            "  #{} {} [{}] -> {}  installs {} swaps {} enables {} disables {} reverts {} enabled {:.1} s",
            s.id,
            s.target,
            s.state,
            s.with,
            s.installs,
            s.swaps,
            s.enables,
            s.disables,
            s.reverts,
            s.enabled_seconds,
        )
        .map_err(io)?;
        if let Some(c) = &s.canary {
            super::remote::canary_line(out, c).map_err(io)?;
        }
    }
    Ok(())
}
