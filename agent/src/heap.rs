//! The heap commands: `heap_start`, `heap_snapshot` (the profile comes back
//! as a payload), `heap_stop` and `leak_check`, over [`hotpatch_heap`].

use std::io::{self, Write};

use crate::protocol::{
    Coded, ErrorBody, HeapSnapshotInfo, HeapStartInfo, HeapStats, HeapStopInfo, LeakCheckInfo,
    PayloadHeader, Reply, Request,
};
use crate::wire::write_reply;

/// Most cycles a leak check runs.
pub const MAX_CYCLES: u32 = 100_000;

fn bad(msg: impl Into<String>) -> ErrorBody {
    ErrorBody::new(crate::protocol::E_AGENT_BAD_ARGS, msg)
}

/// Runs one heap request and writes its reply (and the profile payload).
pub(crate) fn run(req: Request, w: &mut impl Write) -> io::Result<()> {
    match req {
        Request::HeapSnapshot => match snapshot() {
            Ok((reply, pb)) => {
                write_reply(w, &reply)?;
                w.write_all(&pb)?;
                w.flush()
            }
            Err(e) => write_reply(w, &Reply::err(e)),
        },
        req => write_reply(w, &handle(req).unwrap_or_else(Reply::err)),
    }
}

fn handle(req: Request) -> Result<Reply, ErrorBody> {
    match req {
        Request::HeapStart { rate } => {
            let rate = rate.unwrap_or(hotpatch_heap::DEFAULT_RATE);
            hotpatch_heap::start(rate).map_err(|e| e.to_body())?;
            let allocator = hotpatch_heap::running().map(|r| r.1).unwrap_or_default();
            Reply::typed(&HeapStartInfo { rate, allocator })
        }
        Request::HeapStop => {
            let stats = hotpatch_heap::sampler_counters();
            hotpatch_heap::stop().map_err(|e| e.to_body())?;
            Reply::typed(&HeapStopInfo {
                stopped: true,
                stats: heap_stats(&stats)?,
            })
        }
        Request::LeakCheck {
            path,
            cycles,
            entry,
            calls,
            rate,
        } => {
            if path.is_empty() {
                return Err(bad("path is empty"));
            }
            if cycles > MAX_CYCLES {
                return Err(bad(format!("cycles must be at most {MAX_CYCLES}")));
            }
            let opts = hotpatch_heap::LeakCheck {
                cycles,
                entry: entry.map(|e| (e, calls.unwrap_or(1))),
                rate: rate.unwrap_or(hotpatch_heap::LeakCheck::default().rate),
            };
            let r = hotpatch_heap::leak_check(&path, &opts).map_err(|e| e.to_body())?;
            let report = match serde_json::to_value(&r) {
                Ok(serde_json::Value::Object(m)) => m,
                Ok(_) => return Err(internal("a leak report is not a JSON object")),
                Err(e) => return Err(internal(e.to_string())),
            };
            Reply::typed(&LeakCheckInfo {
                leaks: r.leaks(),
                table: r.table(),
                report,
            })
        }
        _ => Err(ErrorBody::new(
            crate::protocol::E_AGENT_INTERNAL,
            "not a heap command",
        )),
    }
}

/// The heap crate's counters as the protocol's [`HeapStats`].
fn heap_stats(s: &hotpatch_heap::HeapStats) -> Result<HeapStats, ErrorBody> {
    serde_json::to_value(s)
        .and_then(serde_json::from_value)
        .map_err(|e| internal(format!("heap counters: {e}")))
}

fn internal(msg: impl Into<String>) -> ErrorBody {
    ErrorBody::new(crate::protocol::E_AGENT_INTERNAL, msg)
}

fn snapshot() -> Result<(Reply, Vec<u8>), ErrorBody> {
    let p = hotpatch_heap::snapshot().map_err(|e| e.to_body())?;
    let mut pb = Vec::new();
    p.write_pprof(&mut pb).map_err(|e| e.to_body())?;
    let (ao, a, io, i) = p.totals();
    let v = Reply::typed(&HeapSnapshotInfo {
        rate: p.rate,
        alloc_objects: ao,
        alloc_space: a,
        inuse_objects: io,
        inuse_space: i,
        inuse_space_sd: Some(p.inuse_space_sd()),
        stacks: p.samples.len(),
        stats: heap_stats(&p.stats)?,
        payloads: vec![PayloadHeader {
            name: "heap.pb.gz".into(),
            len: pb.len() as u64,
        }],
    })?;
    Ok((v, pb))
}
