//! The `profile` and `profile_raw` commands: sample the host, send the
//! profile back as payloads after the JSON reply.
//!
//! `profile_raw` (what `hotpatch profile` uses) sends the raw capture —
//! addresses and the module history they need — and the client resolves
//! it: the host never loads DWARF for a profile (before, one `hotpatch
//! profile` of `demo-target` grew its RSS from ~6 MB to ~0.5 GB).
//! `profile` resolves here and sends `profile.pb.gz` (and a flamegraph),
//! for clients that cannot resolve (the in-process tour).
//!
//! The profile lock is held while sampling only: it is released before the
//! reply and payloads are written, so a client may start the next profile
//! as soon as it has the reply, even while it still reads the payloads.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use serde_json::json;

use crate::protocol::check_profile_args as check_args;
use crate::protocol::{E_AGENT_PROFILE_BUSY, ErrorBody, PayloadHeader, RAW_PROFILE_PAYLOAD, Reply};
use crate::server::{Shared, write_reply};

/// Set while a session samples (between its start and its stop).
static SAMPLING: AtomicBool = AtomicBool::new(false);

/// Whether a profile is sampling now (for `status`): from the moment the
/// session started to the moment it stopped, so a module unloaded while
/// this is seen true is unloaded during the profile.
pub(crate) fn running(_shared: &Shared) -> bool {
    SAMPLING.load(Ordering::SeqCst)
}

/// Starts a session, sleeps `d` with [`SAMPLING`] set, and hands the
/// running session to `stop`.
fn sample_for<T>(
    d: Duration,
    hz: i32,
    stop: impl FnOnce(hotpatch_profiler::Session) -> hotpatch_profiler::Result<T>,
) -> Result<T, ErrorBody> {
    let session = hotpatch_profiler::ProfilerBuilder::new()
        .frequency(hz)
        .start()
        .map_err(|e| prof_err(&e))?;
    SAMPLING.store(true, Ordering::SeqCst);
    std::thread::sleep(d);
    SAMPLING.store(false, Ordering::SeqCst);
    stop(session).map_err(|e| prof_err(&e))
}

/// The profile lock, or the busy error.
fn take(lock: &Mutex<()>) -> Result<MutexGuard<'_, ()>, ErrorBody> {
    match lock.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(TryLockError::WouldBlock) => Err(ErrorBody::new(
            E_AGENT_PROFILE_BUSY,
            "another profile is being taken",
        )),
    }
}

/// Writes the reply, then the payloads it announces.
fn send(
    w: &mut impl Write,
    outcome: Result<(serde_json::Value, Vec<Vec<u8>>), ErrorBody>,
) -> io::Result<()> {
    match outcome {
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

pub(crate) fn run(
    shared: &Shared,
    seconds: f64,
    hz: Option<u32>,
    top: Option<usize>,
    flamegraph: bool,
    w: &mut impl Write,
) -> io::Result<()> {
    let outcome = check_args(seconds, hz).and_then(|(d, hz)| {
        let guard = take(&shared.profile)?;
        let r = sample(d, hz, top.unwrap_or(20), flamegraph);
        // Released before anything is written (issue #11, item 7).
        drop(guard);
        r
    });
    send(w, outcome)
}

pub(crate) fn run_raw(
    shared: &Shared,
    seconds: f64,
    hz: Option<u32>,
    w: &mut impl Write,
) -> io::Result<()> {
    run_raw_locked(&shared.profile, seconds, hz, w)
}

/// `profile_raw` with the profile lock `lock`.
fn run_raw_locked(
    lock: &Mutex<()>,
    seconds: f64,
    hz: Option<u32>,
    w: &mut impl Write,
) -> io::Result<()> {
    let outcome = check_args(seconds, hz).and_then(|(d, hz)| {
        let guard = take(lock)?;
        let raw = capture(d, hz);
        // Released before the capture is encoded and written: a client
        // that has the reply may start the next profile at once.
        drop(guard);
        let raw = raw?;
        let body = raw.to_json().map_err(|e| prof_err(&e))?;
        let result = json!({
            "samples": raw.samples(),
            "frequency": raw.frequency,
            "duration_s": Duration::from_nanos(raw.duration_ns).as_secs_f64(),
            "epochs": raw.epochs.len(),
            "modules": raw.modules.len(),
            "errors": raw.errors,
            "payloads": [PayloadHeader {
                name: RAW_PROFILE_PAYLOAD.into(),
                len: body.len() as u64,
            }],
        });
        Ok((result, vec![body]))
    });
    send(w, outcome)
}

fn prof_err(e: &hotpatch_profiler::Error) -> ErrorBody {
    ErrorBody::new(e.code(), e.to_string())
}

/// Samples for `d` and returns the raw capture (nothing resolved).
fn capture(d: Duration, hz: i32) -> Result<hotpatch_profiler::RawProfile, ErrorBody> {
    sample_for(d, hz, hotpatch_profiler::Session::stop_raw)
}

/// Samples for `d`, then resolves and encodes: the result object and the
/// payload bytes it announces.
fn sample(
    d: Duration,
    hz: i32,
    top: usize,
    flamegraph: bool,
) -> Result<(serde_json::Value, Vec<Vec<u8>>), ErrorBody> {
    let report = sample_for(d, hz, hotpatch_profiler::Session::stop)?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::protocol::E_AGENT_BAD_ARGS;

    /// A writer that records whether the profile lock was held while
    /// anything was written to it.
    struct Probe<'a> {
        lock: &'a Mutex<()>,
        held_while_writing: bool,
        bytes: Vec<u8>,
    }

    impl Write for Probe<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if matches!(self.lock.try_lock(), Err(TryLockError::WouldBlock)) {
                self.held_while_writing = true;
            }
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_profile_lock_is_released_before_the_reply_is_written() {
        let lock = Mutex::new(());
        let mut w = Probe {
            lock: &lock,
            held_while_writing: false,
            bytes: Vec::new(),
        };
        run_raw_locked(&lock, 0.05, Some(99), &mut w).unwrap();
        let line_end = w.bytes.iter().position(|&b| b == b'\n').unwrap();
        let reply: Reply = serde_json::from_slice(&w.bytes[..line_end]).unwrap();
        assert!(reply.ok, "{reply:?}");
        let len = reply.result.unwrap()["payloads"][0]["len"]
            .as_u64()
            .unwrap();
        assert_eq!(w.bytes.len() - line_end - 1, len as usize);
        assert!(
            !w.held_while_writing,
            "the profile lock was held while the reply was written"
        );
    }

    #[test]
    fn float_arguments_are_checked() {
        for s in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -1.0, 600.5] {
            assert_eq!(
                check_args(s, None).unwrap_err().code,
                E_AGENT_BAD_ARGS,
                "{s}"
            );
        }
        assert_eq!(check_args(1.0, Some(0)).unwrap_err().code, E_AGENT_BAD_ARGS);
        assert!(check_args(600.0, Some(10_000)).is_ok());
        // A busy lock is refused with its own code, before any sampling.
        let lock = Mutex::new(());
        let _held = lock.lock().unwrap();
        let mut out = Vec::new();
        run_raw_locked(&lock, 0.01, None, &mut out).unwrap();
        let reply: Reply = serde_json::from_slice(out.trim_ascii_end()).unwrap();
        assert_eq!(reply.error.unwrap().code, E_AGENT_PROFILE_BUSY);
    }
}
