//! `hotpatch profile`: sample a running process; the profile comes back
//! over the socket.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Conn, Failure, Outcome};
use crate::client::{self, Client};
use crate::protocol::{PayloadHeader, Request};

/// Arguments of `hotpatch profile`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to sample, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Samples per second per thread.
    #[arg(long)]
    pub hz: Option<u32>,
    /// Where to write the gzipped pprof profile (`go tool pprof` reads it).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        default_value = "profile.pb.gz"
    )]
    pub output: PathBuf,
    /// Also write a flamegraph SVG here.
    #[arg(long, value_name = "SVG")]
    pub flamegraph: Option<PathBuf>,
    /// Lines of the top-functions table printed.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    #[command(flatten)]
    conn: Conn,
    /// Print the result (without the table) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A countdown on stderr while the agent samples; only on a terminal.
fn progress(seconds: f64) -> Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let t = std::thread::spawn(move || {
        let t0 = Instant::now();
        while !d.load(Ordering::Relaxed) {
            let e = t0.elapsed().as_secs_f64();
            let msg = if e < seconds {
                format!("profiling… {e:.1}/{seconds:.1} s")
            } else {
                "resolving symbols…".to_owned()
            };
            eprint!("\r\x1b[2K{msg}");
            std::thread::sleep(Duration::from_millis(100));
        }
        eprint!("\r\x1b[2K");
    });
    Some((done, t))
}

/// Runs `hotpatch profile`.
///
/// # Errors
/// See [`super::remote::call`]; `E_AGENT_PROFILE`; writing the files.
pub fn run(a: &Args, out: &mut dyn Write) -> Outcome {
    let fail = |e: &crate::Error| Failure::from_error(e, a.json);
    let socket = client::locate(a.conn.pid, a.conn.socket.as_deref()).map_err(|e| fail(&e))?;
    let mut c = Client::connect(&socket).map_err(|e| fail(&e))?;
    c.set_read_timeout(Some(Duration::from_secs_f64(
        a.seconds.clamp(0.0, 3600.0) + 120.0,
    )))
    .map_err(|e| fail(&e))?;
    let req = Request::Profile {
        seconds: a.seconds,
        hz: a.hz,
        top: Some(a.top),
        flamegraph: a.flamegraph.is_some(),
    };
    let bar = progress(a.seconds);
    let reply = c.request(&req);
    if let Some((done, t)) = bar {
        done.store(true, Ordering::Relaxed);
        let _ = t.join();
    }
    let v = client::into_result(reply.map_err(|e| fail(&e))?).map_err(|e| fail(&e))?;
    let headers: Vec<PayloadHeader> = serde_json::from_value(v["payloads"].clone())
        .map_err(|e| Failure::new("E_AGENT_PROTOCOL", format!("bad payload list: {e}"), a.json))?;
    let bodies = c.read_payloads(&headers).map_err(|e| fail(&e))?;
    let mut written = Vec::new();
    for (h, b) in headers.iter().zip(&bodies) {
        let path = if h.name.ends_with(".svg") {
            match &a.flamegraph {
                Some(p) => p,
                None => continue,
            }
        } else {
            &a.output
        };
        std::fs::write(path, b).map_err(|e| {
            Failure::new(
                "E_AGENT_IO",
                format!("writing {}: {e}", path.display()),
                a.json,
            )
        })?;
        written.push(path.display().to_string());
    }
    let w = if a.json {
        let mut v = v.clone();
        v["written"] = serde_json::json!(written);
        writeln!(out, "{v}")
    } else {
        write!(out, "{}", v["top"].as_str().unwrap_or_default()).and_then(|()| {
            if v["top"].as_str().is_none_or(str::is_empty) {
                writeln!(out, "{} samples", v["samples"])?;
            }
            for p in &written {
                writeln!(out, "wrote {p}")?;
            }
            Ok(())
        })
    };
    w.map_err(|e| Failure::io(&e))
}
