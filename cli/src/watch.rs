//! `hotpatch watch`: edit, save, live.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use super::remote::call;
use super::{Conn, Failure, Outcome};
use crate::protocol::{Request, WatchApplyInfo, WatchStatusInfo};

/// Arguments of `hotpatch watch`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    /// The package's `Cargo.toml` (default: found from this directory).
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,
    /// The package, when the workspace has several with that binary.
    #[arg(long, short = 'p')]
    pub package: Option<String>,
    /// Apply the current edit once and exit (no watching).
    #[arg(long)]
    pub once: bool,
    /// Put the original code back everywhere and exit.
    #[arg(long)]
    pub revert: bool,
    /// Show the live generation, its sites and the generations still
    /// mapped (unmapping those no longer used), and exit.
    #[arg(long)]
    pub status: bool,
    /// Print results as JSON (one object per applied save).
    #[arg(long)]
    pub json: bool,
}

fn fail(e: &hotpatch_watch::Error, json: bool) -> Failure {
    Failure::new(e.code(), e.message.clone(), json)
}

/// Runs `hotpatch watch`.
///
/// # Errors
/// The agent's and watch's refusals, with their codes.
pub fn run(a: &Args, out: &mut dyn Write) -> Outcome {
    if a.revert {
        let r: WatchApplyInfo = call(&a.conn, a.json, &Request::WatchRevert)?;
        let v = serde_json::to_value(&r).map_err(|e| Failure::io(&std::io::Error::other(e)))?;
        return print(out, a.json, &v, |o| {
            writeln!(
                o,
                "reverted {} function(s) to the original code{}{}",
                r.reverted.len(),
                if r.reverted.is_empty() { "" } else { ": " },
                r.reverted.join(", ")
            )
        });
    }
    if a.status {
        let st: WatchStatusInfo = call(&a.conn, a.json, &Request::WatchStatus)?;
        let v = serde_json::to_value(&st).map_err(|e| Failure::io(&std::io::Error::other(e)))?;
        return print(out, a.json, &v, |o| {
            writeln!(o, "generation {}", st.generation)?;
            for s in &st.sites {
                writeln!(
                    o,
                    "  {} (generation {}{})",
                    s.function,
                    s.generation,
                    if s.enabled { "" } else { ", disabled" }
                )?;
            }
            for g in &st.mapped {
                writeln!(o, "  mapped: generation {} ({} bytes)", g.generation, g.len)?;
            }
            Ok(())
        });
    }
    let ping: crate::protocol::PingInfo = call(&a.conn, a.json, &Request::Ping)?;
    let pid = ping.pid as i32;
    // Talk to exactly that process from now on.
    let conn = Conn {
        pid: Some(pid as u32),
        socket: a.conn.socket.clone(),
    };
    let opts = hotpatch_watch::session::Options {
        pid,
        manifest_path: a.manifest_path.clone(),
        package: a.package.clone(),
    };
    if a.once {
        let mut session = hotpatch_watch::session::Session::new(opts, false);
        return once(&conn, &mut session, a.json, out);
    }
    // Capture the baseline now, before the first edit is built over it;
    // the session keeps it, the project and the executable's symbols.
    let mut session = hotpatch_watch::session::Session::new(opts, true);
    session.baseline().map_err(|e| fail(&e, a.json))?;
    // The agent reads the executable's symbol table once, on the first
    // apply or status: now, rather than on the first save.
    let _: WatchStatusInfo = call(&conn, a.json, &Request::WatchStatus)?;
    let src = session
        .project()
        .map_err(|e| fail(&e, a.json))?
        .manifest
        .parent()
        .map(|d| d.join("src"))
        .unwrap_or_else(|| PathBuf::from("src"));
    if a.json {
        let _ = writeln!(out, "{}", json!({"watching": src, "pid": pid}));
    } else {
        let _ = writeln!(
            out,
            "watching {} (pid {pid}); save a file to patch, Ctrl-C to stop",
            src.display()
        );
    }
    let _ = out.flush();
    let mut last = newest_mtime(&src);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = newest_mtime(&src);
        if now <= last {
            continue;
        }
        last = now;
        if let Err(f) = once(&conn, &mut session, a.json, out) {
            // Keep watching: print the refusal like the CLI does on exit
            // (JSON on stdout with --json, the sentence on stderr).
            if f.json {
                let body = json!({
                    "ok": false,
                    "error": { "code": f.code, "message": f.message },
                });
                let _ = writeln!(out, "{body}");
                eprintln!("hotpatch: {}: {}", f.code, f.message);
            } else {
                let _ = writeln!(out, "hotpatch: {}: {}", f.code, f.message);
            }
            let _ = out.flush();
        }
    }
}

fn newest_mtime(dir: &std::path::Path) -> SystemTime {
    let mut best = SystemTime::UNIX_EPOCH;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if let Ok(t) = m.modified() {
                best = best.max(t);
            }
        }
    }
    best
}

fn once(
    conn: &Conn,
    session: &mut hotpatch_watch::session::Session,
    json: bool,
    out: &mut dyn Write,
) -> Outcome {
    let t0 = Instant::now();
    let p = session.prepare().map_err(|e| fail(&e, json))?;
    let t = Instant::now();
    let req = Request::WatchApply {
        bundle: p.bundle_path.display().to_string(),
    };
    let r = call(conn, json, &req);
    let _ = std::fs::remove_file(&p.bundle_path);
    let r: WatchApplyInfo = r?;
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    let total = t0.elapsed().as_secs_f64();
    let tm = p.timings;
    let v = json!({
        "generation": r.generation,
        "applied": r.applied,
        "patched": r.patched,
        "added": r.added,
        "reverted": r.reverted,
        "unloaded": r.unloaded,
        "retained": r.retained,
        "debug_file": r.debug_file,
        "timings_ms": {
            "setup": tm.setup_ms, "build": tm.build_ms, "diff": tm.diff_ms,
            "exe_symbols": tm.exe_ms, "checks": tm.check_ms, "link": tm.link_ms,
            "apply": apply_ms, "agent": r.micros as f64 / 1e3, "total": total * 1e3,
        },
    });
    print(out, json, &v, |o| {
        if !r.applied {
            return writeln!(
                o,
                "nothing to apply: the build is what the process runs (generation {}; {:.2} s, build {:.2})",
                r.generation,
                total,
                tm.build_ms / 1e3,
            );
        }
        writeln!(
            o,
            "patched {} function(s) in {:.2} s (build {:.2}, diff {:.3}, link {:.3}, apply {:.3}), generation {}{}",
            r.patched.len(),
            total,
            tm.build_ms / 1e3,
            tm.diff_ms / 1e3,
            tm.link_ms / 1e3,
            apply_ms / 1e3,
            r.generation,
            if r.patched.is_empty() { "" } else { ":" }
        )?;
        if !r.patched.is_empty() {
            writeln!(o, "  {}", r.patched.join(", "))?;
        } else if p.diff.changed.is_empty() {
            writeln!(
                o,
                "  no function of {} differs from the running build (only the binary crate's own code is patched, not other crates')",
                p.project.crate_name
            )?;
        }
        if !r.reverted.is_empty() {
            writeln!(o, "  back to the original: {}", r.reverted.join(", "))?;
        }
        if !r.unloaded.is_empty() {
            let list: Vec<String> = r.unloaded.iter().map(u64::to_string).collect();
            writeln!(o, "  generations unloaded: {}", list.join(", "))?;
        }
        Ok(())
    })
}

fn print(
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
    r.and_then(|()| out.flush()).map_err(|e| Failure::io(&e))
}
