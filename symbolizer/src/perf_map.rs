//! `perf-<pid>.map` export, so `perf report` names our anonymous code.
//!
//! Format (one line per range, as perf reads it): `START SIZE name`, start
//! and size in hex without `0x`. perf reads `/tmp/perf-<pid>.map` of the
//! profiled pid.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::registry::{ModuleKind, Registry};

/// The conventional path for this process: `/tmp/perf-<pid>.map`.
pub fn default_path() -> PathBuf {
    PathBuf::from(format!("/tmp/perf-{}.map", std::process::id()))
}

/// The perf map lines for every *live* anonymous range of `reg`.
pub fn render(reg: &Registry) -> String {
    let mut out = String::new();
    for m in reg.modules() {
        if let (ModuleKind::Anon(a), None) = (&m.kind, m.unloaded_seq) {
            // Names cannot contain newlines in this format.
            let name = a.name.replace(['\n', '\r'], " ");
            out.push_str(&format!("{:x} {:x} {}\n", a.start.0, a.len, name));
        }
    }
    out
}

/// Writes [`render`]'s output to `path` atomically (temp file + rename), so
/// perf never reads a half-written map.
///
/// # Errors
/// `E_SYM_IO` when the file cannot be written.
pub fn write(reg: &Registry, path: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("map.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(render(reg).as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::addr::RuntimeAddr;

    #[test]
    fn live_anonymous_ranges_only() {
        let r = Registry::new();
        r.register_anon(
            "hotpatch::trampoline<price>",
            RuntimeAddr(0x7f00_1000),
            0x40,
        )
        .unwrap();
        let gone = r
            .register_anon("old", RuntimeAddr(0x7f00_2000), 0x10)
            .unwrap();
        r.unregister(gone).unwrap();
        assert_eq!(render(&r), "7f001000 40 hotpatch::trampoline<price>\n");
        let dir = std::env::temp_dir().join(format!("hp-perfmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("perf-1.map");
        write(&r, &p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), render(&r));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
