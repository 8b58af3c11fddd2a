//! Who could replace a file: the ownership and permission rules shared by
//! plugin files and the trusted-keys directory.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, Result, ShortPath};

fn is_path_error(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::InvalidInput
        || matches!(e.raw_os_error(), Some(libc::ENAMETOOLONG | libc::ELOOP))
}

/// `E_PLG_BAD_PATH` for an error about the path, else `E_PLG_IO`.
pub(crate) fn io_error(path: &Path, e: std::io::Error) -> Error {
    if is_path_error(&e) {
        Error::BadPath {
            path: ShortPath(path.to_path_buf()),
            source: e,
        }
    } else {
        Error::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `E_PLG_UNSAFE_OWNER` when the file, or a directory on its resolved path,
/// is owned by a user other than root and us, or is a directory others can
/// write without the sticky bit (as sshd's `StrictModes`): such a user could
/// replace the plugin between our checks and a later load. `None` when the
/// path is safe.
pub(crate) fn ownership(path: &Path, meta: &std::fs::Metadata) -> Result<Option<Error>> {
    let me = euid();
    let problem = |culprit: &Path, reason: String| {
        Some(Error::UnsafeOwner {
            path: path.to_path_buf(),
            culprit: ShortPath(culprit.to_path_buf()),
            reason,
            euid: me,
        })
    };
    let trusted = |uid: u32| uid == 0 || uid == me;
    if !trusted(meta.uid()) {
        return Ok(problem(path, format!("owned by uid {}", meta.uid())));
    }
    let real = std::fs::canonicalize(path).map_err(|e| io_error(path, e))?;
    for dir in real.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(|e| io_error(path, e))?;
        if !trusted(m.uid()) {
            return Ok(problem(
                dir,
                format!("a directory owned by uid {}", m.uid()),
            ));
        }
        let mode = m.mode() & 0o7777;
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Ok(problem(
                dir,
                format!(
                    "a directory writable by group or others without the sticky bit (mode {mode:o})"
                ),
            ));
        }
    }
    Ok(None)
}
