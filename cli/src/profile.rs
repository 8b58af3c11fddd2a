//! `hotpatch profile`: sample a running process; the raw capture comes back
//! over the socket and is resolved here (the target loads no debug info).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hotpatch_profiler::capture::Limits;
use hotpatch_symbolizer::DebugSearch;

use super::{Conn, Failure, Outcome};
use crate::client::{self, Client};
use crate::protocol::{E_AGENT_UNKNOWN_COMMAND, PayloadHeader, RAW_PROFILE_PAYLOAD, Request};

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

/// Runs `hotpatch profile`: the agent samples and sends the raw capture;
/// symbols are resolved here, from the same files, so the target loads no
/// debug info. Falls back to `profile` (resolved in the target) for an
/// agent that does not know `profile_raw`.
///
/// # Errors
/// See [`super::remote::call`]; `E_AGENT_BAD_ARGS` for arguments out of
/// range (checked before connecting); `E_AGENT_PROTOCOL` for a payload list
/// that is not one raw capture within the size limit; `E_PROF_BAD_CAPTURE`;
/// `E_AGENT_IO` writing the files.
pub fn run(a: &Args, out: &mut dyn Write) -> Outcome {
    let fail = |e: &crate::Error| Failure::from_error(e, a.json);
    // Every number is checked before anything is sent (a NaN used to
    // panic the CLI when it computed its read timeout).
    crate::protocol::check_profile_args(a.seconds, a.hz)
        .map_err(|e| Failure::new(e.code, e.message, a.json))?;
    let socket = client::locate(a.conn.pid, a.conn.socket.as_deref()).map_err(|e| fail(&e))?;
    let mut c = Client::connect(&socket).map_err(|e| fail(&e))?;
    c.set_read_timeout(Some(Duration::from_secs_f64(a.seconds + 120.0)))
        .map_err(|e| fail(&e))?;
    let bar = progress(a.seconds);
    let reply = c.request(&Request::ProfileRaw {
        seconds: a.seconds,
        hz: a.hz,
    });
    let reply = match reply {
        Ok(r)
            if r.error
                .as_ref()
                .is_some_and(|e| e.code == E_AGENT_UNKNOWN_COMMAND) =>
        {
            stop_progress(bar);
            return run_resolved_remotely(a, out);
        }
        other => other,
    };
    let v = reply
        .map_err(|e| fail(&e))
        .and_then(|r| client::into_result(r).map_err(|e| fail(&e)));
    let v = match v {
        Ok(v) => v,
        Err(e) => {
            stop_progress(bar);
            return Err(e);
        }
    };
    let got = read_capture(&mut c, &v, a.json);
    // Resolution happens here, under the "resolving symbols…" line.
    let resolved = got.map(|raw| raw.resolve(&DebugSearch::default()));
    stop_progress(bar);
    let (report, warnings) = resolved?;
    for w in &warnings {
        eprintln!("hotpatch: warning: {w}");
    }
    let mut pb = Vec::new();
    report
        .write_pprof(&mut pb)
        .map_err(|e| Failure::new(e.code(), e.to_string(), a.json))?;
    let mut written = Vec::new();
    write_atomic(&a.output, &pb).map_err(|e| io_fail(&a.output, &e, a.json))?;
    written.push(a.output.display().to_string());
    if let Some(path) = &a.flamegraph {
        let mut svg = Vec::new();
        match report.write_flamegraph(&mut svg) {
            Ok(()) => {
                write_atomic(path, &svg).map_err(|e| io_fail(path, &e, a.json))?;
                written.push(path.display().to_string());
            }
            // No samples at all makes an empty flamegraph an error in
            // inferno; the profile itself is still written.
            Err(_) if report.stats.samples == 0 => {
                eprintln!("hotpatch: no samples: no flamegraph written");
            }
            Err(e) => return Err(Failure::new(e.code(), e.to_string(), a.json)),
        }
    }
    let s = &report.stats;
    let mut v = v;
    v["stacks"] = serde_json::json!(s.stacks);
    v["locations"] = serde_json::json!(s.locations);
    v["unnamed_locations"] = serde_json::json!(s.unnamed_locations);
    v["resolve_s"] = serde_json::json!(s.resolve_time.as_secs_f64());
    v["top"] = serde_json::json!(report.top(a.top));
    v["warnings"] = serde_json::json!(warnings);
    print_result(a, &v, &written, out)
}

/// Reads and checks the one raw capture a `profile_raw` result announces.
fn read_capture(
    c: &mut Client,
    v: &serde_json::Value,
    json: bool,
) -> Result<hotpatch_profiler::RawProfile, Failure> {
    let limits = Limits::default();
    let proto = |m: String| Failure::new("E_AGENT_PROTOCOL", m, json);
    let headers: Vec<PayloadHeader> = serde_json::from_value(v["payloads"].clone())
        .map_err(|e| proto(format!("bad payload list: {e}")))?;
    let [h] = headers.as_slice() else {
        return Err(proto(format!(
            "expected one {RAW_PROFILE_PAYLOAD} payload, got {}",
            headers.len()
        )));
    };
    if h.name != RAW_PROFILE_PAYLOAD {
        return Err(proto(format!(
            "expected a {RAW_PROFILE_PAYLOAD} payload, got {:?}",
            h.name
        )));
    }
    // Refused before a byte is read: nothing is sized by the stated length.
    if h.len > limits.max_bytes as u64 {
        return Err(proto(format!(
            "a {}-byte capture is over the limit of {} bytes",
            h.len, limits.max_bytes
        )));
    }
    let bodies = c
        .read_payloads(std::slice::from_ref(h))
        .map_err(|e| Failure::from_error(&e, json))?;
    let body = bodies.first().map_or(&[][..], Vec::as_slice);
    hotpatch_profiler::RawProfile::from_json(body, &limits)
        .map_err(|e| Failure::new(e.code(), e.to_string(), json))
}

/// `profile` for an agent without `profile_raw`: resolved in the target.
fn run_resolved_remotely(a: &Args, out: &mut dyn Write) -> Outcome {
    let fail = |e: &crate::Error| Failure::from_error(e, a.json);
    let socket = client::locate(a.conn.pid, a.conn.socket.as_deref()).map_err(|e| fail(&e))?;
    let mut c = Client::connect(&socket).map_err(|e| fail(&e))?;
    c.set_read_timeout(Some(Duration::from_secs_f64(a.seconds + 120.0)))
        .map_err(|e| fail(&e))?;
    let req = Request::Profile {
        seconds: a.seconds,
        hz: a.hz,
        top: Some(a.top),
        flamegraph: a.flamegraph.is_some(),
    };
    let bar = progress(a.seconds);
    let reply = c.request(&req);
    stop_progress(bar);
    let v = client::into_result(reply.map_err(|e| fail(&e))?).map_err(|e| fail(&e))?;
    let headers: Vec<PayloadHeader> = serde_json::from_value(v["payloads"].clone())
        .map_err(|e| Failure::new("E_AGENT_PROTOCOL", format!("bad payload list: {e}"), a.json))?;
    let limit = Limits::default().max_bytes as u64;
    if let Some(h) = headers.iter().find(|h| h.len > limit) {
        return Err(Failure::new(
            "E_AGENT_PROTOCOL",
            format!("payload {} of {} bytes is over the limit", h.name, h.len),
            a.json,
        ));
    }
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
        write_atomic(path, b).map_err(|e| io_fail(path, &e, a.json))?;
        written.push(path.display().to_string());
    }
    print_result(a, &v, &written, out)
}

fn print_result(
    a: &Args,
    v: &serde_json::Value,
    written: &[String],
    out: &mut dyn Write,
) -> Outcome {
    let w = if a.json {
        let mut v = v.clone();
        v["written"] = serde_json::json!(written);
        writeln!(out, "{v}")
    } else {
        write!(out, "{}", v["top"].as_str().unwrap_or_default()).and_then(|()| {
            if v["top"].as_str().is_none_or(str::is_empty) {
                writeln!(out, "{} samples", v["samples"])?;
            }
            for p in written {
                writeln!(out, "wrote {p}")?;
            }
            Ok(())
        })
    };
    w.map_err(|e| Failure::io(&e))
}

fn io_fail(path: &Path, e: &std::io::Error, json: bool) -> Failure {
    Failure::new(
        "E_AGENT_IO",
        format!("writing {}: {e}", path.display()),
        json,
    )
}

fn stop_progress(bar: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>) {
    if let Some((done, t)) = bar {
        done.store(true, Ordering::Relaxed);
        let _ = t.join();
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` through a new temporary file in the same
/// directory, renamed over `path` once complete: a reader never sees a
/// partial file, and what `path` was before (a symlink, a hard link to
/// another file) is replaced, never written through. On failure the
/// temporary file is removed and `path` is untouched.
///
/// # Errors
/// Creating, writing, syncing or renaming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".hotpatch-{}-{}.tmp",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    // `create_new`: O_EXCL, so an existing file or symlink by that name is
    // an error, never followed.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(&tmp)?;
    let done = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}
