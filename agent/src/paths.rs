//! Where agents put their sockets, and finding running agents.
//!
//! `$XDG_RUNTIME_DIR/hotpatch/<pid>.sock` when `XDG_RUNTIME_DIR` is set to
//! an absolute directory, else `/tmp/hotpatch-<uid>/<pid>.sock`. The
//! directory is created `0700`; an existing one must be a real directory
//! (not a symlink) owned by us, and is reset to `0700`.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// The socket directory for the current environment and uid.
pub fn socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() && d.is_dir() => d.join("hotpatch"),
        _ => fallback_dir(),
    }
}

/// `/tmp/hotpatch-<uid>`.
pub fn fallback_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/hotpatch-{}", sys::uid()))
}

/// The directories a client searches: the current environment's and the
/// fallback (a host may have been started with another environment).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![socket_dir()];
    let fb = fallback_dir();
    if !dirs.contains(&fb) {
        dirs.push(fb);
    }
    dirs
}

/// The socket path of `pid` in `dir`.
pub fn socket_in(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.sock"))
}

/// Creates `dir` with mode 0700, or checks an existing one (a directory, not
/// a symlink, owned by us) and resets its mode to 0700.
///
/// # Errors
/// The OS error; `PermissionDenied` when the directory belongs to another
/// user or is not a directory.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let md = fs::symlink_metadata(dir)?;
    if !md.file_type().is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a directory", dir.display()),
        ));
    }
    if md.uid() != sys::uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to us ({})",
                dir.display(),
                md.uid(),
                sys::uid()
            ),
        ));
    }
    if md.mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A socket file found in a socket directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The pid from the file name.
    pub pid: u32,
    /// The socket file.
    pub socket: PathBuf,
    /// Whether a process with that pid is running.
    pub alive: bool,
}

/// Every `<pid>.sock` in the search directories, sorted by pid.
pub fn scan() -> Vec<Found> {
    let mut found = Vec::new();
    for dir in search_dirs() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".sock"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            found.push(Found {
                pid,
                socket: entry.path(),
                alive: i32::try_from(pid).is_ok_and(sys::pid_alive),
            });
        }
    }
    found.sort_by_key(|f| f.pid);
    found.dedup_by_key(|f| f.pid);
    found
}
