//! The heap commands: `heap_start`, `heap_snapshot` (the profile comes back
//! as a payload), `heap_stop` and `leak_check`, over [`hotpatch_heap`].

use std::io::{self, Write};

use serde_json::json;

use crate::protocol::{ErrorBody, PayloadHeader, Reply, Request};
use crate::server::write_reply;

/// Most cycles a leak check runs.
pub const MAX_CYCLES: u32 = 100_000;

fn heap_err(e: &hotpatch_heap::Error) -> ErrorBody {
    ErrorBody::new(e.code(), e.to_string())
}

fn bad(msg: impl Into<String>) -> ErrorBody {
    ErrorBody::new(crate::protocol::E_AGENT_BAD_ARGS, msg)
}

/// Runs one heap request and writes its reply (and the profile payload).
pub(crate) fn run(req: Request, w: &mut impl Write) -> io::Result<()> {
    match req {
        Request::HeapSnapshot => match snapshot() {
            Ok((v, pb)) => {
                write_reply(w, &Reply::ok(v))?;
                w.write_all(&pb)?;
                w.flush()
            }
            Err(e) => write_reply(w, &Reply::err(e)),
        },
        req => {
            let reply = match handle(req) {
                Ok(v) => Reply::ok(v),
                Err(e) => Reply::err(e),
            };
            write_reply(w, &reply)
        }
    }
}

fn handle(req: Request) -> Result<serde_json::Value, ErrorBody> {
    match req {
        Request::HeapStart { rate } => {
            let rate = rate.unwrap_or(hotpatch_heap::DEFAULT_RATE);
            hotpatch_heap::start(rate).map_err(|e| heap_err(&e))?;
            let allocator = hotpatch_heap::running().map(|r| r.1).unwrap_or_default();
            Ok(json!({ "rate": rate, "allocator": allocator }))
        }
        Request::HeapStop => {
            let stats = hotpatch_heap::sampler_counters();
            hotpatch_heap::stop().map_err(|e| heap_err(&e))?;
            Ok(json!({ "stopped": true, "stats": stats }))
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
            let r = hotpatch_heap::leak_check(&path, &opts).map_err(|e| heap_err(&e))?;
            let mut v = serde_json::to_value(&r)
                .map_err(|e| ErrorBody::new(crate::protocol::E_AGENT_INTERNAL, e.to_string()))?;
            v["leaks"] = json!(r.leaks());
            v["table"] = json!(r.table());
            Ok(v)
        }
        _ => Err(ErrorBody::new(
            crate::protocol::E_AGENT_INTERNAL,
            "not a heap command",
        )),
    }
}

fn snapshot() -> Result<(serde_json::Value, Vec<u8>), ErrorBody> {
    let p = hotpatch_heap::snapshot().map_err(|e| heap_err(&e))?;
    let mut pb = Vec::new();
    p.write_pprof(&mut pb).map_err(|e| heap_err(&e))?;
    let (ao, a, io, i) = p.totals();
    let v = json!({
        "rate": p.rate,
        "alloc_objects": ao,
        "alloc_space": a,
        "inuse_objects": io,
        "inuse_space": i,
        "stacks": p.samples.len(),
        "stats": p.stats,
        "payloads": [PayloadHeader { name: "heap.pb.gz".into(), len: pb.len() as u64 }],
    });
    Ok((v, pb))
}
