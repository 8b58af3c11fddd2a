//! The agent's side of `hotpatch watch`: `watch_apply`, `watch_revert`,
//! `watch_status`, over [`hotpatch_watch::apply`].

use std::io::Read;

use crate::protocol::{ErrorBody, Reply, Request};

/// Largest bundle file read.
pub const MAX_BUNDLE: u64 = 256 << 20;

fn err(e: &hotpatch_watch::Error) -> ErrorBody {
    ErrorBody::new(e.code(), e.message.clone())
}

fn read_bundle(path: &str) -> Result<hotpatch_watch::bundle::Bundle, ErrorBody> {
    use hotpatch_watch::error::E_WATCH_BAD_BUNDLE;
    let bad = |m: String| ErrorBody::new(E_WATCH_BAD_BUNDLE, m);
    let f = std::fs::File::open(path).map_err(|e| bad(format!("{path}: {e}")))?;
    // The bundle is code this process will run: like a plugin, it must be
    // the user's own file, writable by no one else.
    let meta = f.metadata().map_err(|e| bad(format!("{path}: {e}")))?;
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(bad(format!(
                "{path}: not a regular file of uid {me} writable only by it"
            )));
        }
    }
    let mut text = Vec::new();
    f.take(MAX_BUNDLE + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad(format!("{path}: {e}")))?;
    if text.len() as u64 > MAX_BUNDLE {
        return Err(bad(format!("{path}: larger than {MAX_BUNDLE} bytes")));
    }
    serde_json::from_slice(&text).map_err(|e| bad(format!("{path}: not a patch bundle: {e}")))
}

/// Serves one watch request.
pub(crate) fn handle(req: Request) -> Result<Reply, ErrorBody> {
    match req {
        Request::WatchApply { bundle } => {
            let b = read_bundle(&bundle)?;
            // The generation's debug module goes beside the bundle (the
            // user's own directory, which the CLI reads profiles against).
            let dir = std::path::Path::new(&bundle).parent();
            let r = hotpatch_watch::apply::apply_in(&b, dir).map_err(|e| err(&e))?;
            Reply::typed(&r)
        }
        Request::WatchRevert => {
            let r = hotpatch_watch::apply::revert_all().map_err(|e| err(&e))?;
            Reply::typed(&r)
        }
        Request::WatchStatus => Reply::typed(&hotpatch_watch::apply::status()),
        _ => Err(ErrorBody::new(
            crate::protocol::E_AGENT_INTERNAL,
            "not a watch request",
        )),
    }
}
