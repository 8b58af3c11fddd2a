//! The `profile` command: sample the host, send the profile back as
//! payloads after the JSON reply.

use std::io::{self, Write};
use std::sync::TryLockError;

use crate::protocol::{E_AGENT_BAD_ARGS, E_AGENT_PROFILE, E_AGENT_PROFILE_BUSY, ErrorBody, Reply};
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
    let _ = (top, flamegraph);
    write_reply(
        w,
        &Reply::err(ErrorBody::new(
            E_AGENT_PROFILE,
            "this agent was built without the profiler",
        )),
    )
}
