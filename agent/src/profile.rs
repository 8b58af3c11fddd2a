//! The `profile` command: sample the host, send the profile back as
//! payloads after the JSON reply.

use std::io::{self, Write};
use std::sync::TryLockError;
use std::time::Duration;

use serde_json::json;

use crate::protocol::{E_AGENT_BAD_ARGS, E_AGENT_PROFILE_BUSY, ErrorBody, PayloadHeader, Reply};
use crate::server::{Shared, write_reply};

/// Longest profile, in seconds.
pub const MAX_SECONDS: f64 = 600.0;

pub(crate) fn run(
    shared: &Shared,
    seconds: f64,
    hz: Option<u32>,
    top: Option<usize>,
    flamegraph: bool,
    w: &mut impl Write,
) -> io::Result<()> {
    let hz = hz.unwrap_or(99);
    if !(seconds > 0.0 && seconds <= MAX_SECONDS) {
        return write_reply(
            w,
            &Reply::err(ErrorBody::new(
                E_AGENT_BAD_ARGS,
                format!("seconds must be in (0, {MAX_SECONDS}], got {seconds}"),
            )),
        );
    }
    if !(1..=10_000).contains(&hz) {
        return write_reply(
            w,
            &Reply::err(ErrorBody::new(
                E_AGENT_BAD_ARGS,
                format!("hz must be in 1..=10000, got {hz}"),
            )),
        );
    }
    let _guard = match shared.profile.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => {
            return write_reply(
                w,
                &Reply::err(ErrorBody::new(
                    E_AGENT_PROFILE_BUSY,
                    "another profile is being taken",
                )),
            );
        }
    };
    let top = top.unwrap_or(20);
    match sample(seconds, hz, top, flamegraph) {
        Ok((result, payloads)) => {
            write_reply(w, &Reply::ok(result))?;
            for p in &payloads {
                w.write_all(p)?;
            }
            w.flush()
        }
        Err(e) => write_reply(w, &Reply::err(e)),
    }
}

fn prof_err(e: &hotpatch_profiler::Error) -> ErrorBody {
    ErrorBody::new(e.code(), e.to_string())
}

/// Samples for `seconds`, then resolves and encodes: the result object and
/// the payload bytes it announces.
fn sample(
    seconds: f64,
    hz: u32,
    top: usize,
    flamegraph: bool,
) -> Result<(serde_json::Value, Vec<Vec<u8>>), ErrorBody> {
    let hz = i32::try_from(hz).map_err(|_| ErrorBody::new(E_AGENT_BAD_ARGS, "hz too large"))?;
    let session = hotpatch_profiler::ProfilerBuilder::new()
        .frequency(hz)
        .start()
        .map_err(|e| prof_err(&e))?;
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let report = session.stop().map_err(|e| prof_err(&e))?;
    let mut pb = Vec::new();
    report.write_pprof(&mut pb).map_err(|e| prof_err(&e))?;
    let mut payloads = vec![pb];
    let mut headers = vec![PayloadHeader {
        name: "profile.pb.gz".into(),
        len: payloads[0].len() as u64,
    }];
    if flamegraph {
        let mut svg = Vec::new();
        match report.write_flamegraph(&mut svg) {
            Ok(()) => {
                headers.push(PayloadHeader {
                    name: "flamegraph.svg".into(),
                    len: svg.len() as u64,
                });
                payloads.push(svg);
            }
            // No samples at all makes an empty flamegraph an error in
            // inferno; the profile itself is still worth sending.
            Err(e) if report.stats.samples == 0 => {
                let _ = e;
            }
            Err(e) => return Err(prof_err(&e)),
        }
    }
    let s = &report.stats;
    let result = json!({
        "samples": s.samples,
        "frequency": report.frequency,
        "duration_s": report.duration.as_secs_f64(),
        "stacks": s.stacks,
        "locations": s.locations,
        "unnamed_locations": s.unnamed_locations,
        "epochs": s.epochs,
        "errors": report.errors,
        "top": report.top(top),
        "payloads": headers,
    });
    Ok((result, payloads))
}
