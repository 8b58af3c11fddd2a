//! Where agents put their sockets, and finding running agents.
//!
//! `$XDG_RUNTIME_DIR/hotpatch/<pid>.sock` when `XDG_RUNTIME_DIR` is set to
//! an absolute directory, else `$TMPDIR/hotpatch-<uid>/<pid>.sock` (`TMPDIR`
//! when absolute, else `/tmp`). The directory is created `0700`; an
//! existing one must be a real directory (not a symlink) owned by us, and
//! is reset to `0700`.
//!
//! Clients trust a socket only when its directory is a real directory of
//! ours with mode `0700` and the socket is ours ([`check_trusted`]; the
//! client adds the server's `SO_PEERCRED`). Without `--pid`/`--socket` a
//! client looks in the current environment's directory only: with
//! `XDG_RUNTIME_DIR` set, whatever sits in the `/tmp` fallback (a squatter's
//! directory, another session's agents) neither answers nor makes the
//! choice ambiguous.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hotpatch_sys::cred as sys;

/// The socket directory for the current environment and uid.
pub fn socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() && d.is_dir() => d.join("hotpatch"),
        _ => fallback_dir(),
    }
}

/// `$TMPDIR/hotpatch-<uid>` (`/tmp` when `TMPDIR` is unset or relative).
pub fn fallback_dir() -> PathBuf {
    let tmp = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    tmp.join(format!("hotpatch-{}", sys::uid()))
}

/// The directories a client searches for "the only agent": the current
/// environment's only ([`socket_dir`]).
pub fn search_dirs() -> Vec<PathBuf> {
    vec![socket_dir()]
}

/// Where else an agent given by pid may be: the fallback directory, when
/// it is not the current one (a host started without `XDG_RUNTIME_DIR`).
pub fn other_dirs() -> Vec<PathBuf> {
    let fb = fallback_dir();
    if search_dirs().contains(&fb) {
        Vec::new()
    } else {
        vec![fb]
    }
}

/// Why the socket file `socket` is not to be trusted, if it is not: its
/// directory must be a real directory (not a symlink) owned by us with mode
/// `0700`, and the socket a socket owned by us. (Who serves it is checked
/// on the connection: `hotpatch_cli::client::Client::connect`.)
///
/// # Errors
/// The reason, for humans.
pub fn check_trusted(socket: &Path) -> Result<(), String> {
    let me = sys::uid();
    let dir = socket.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or_else(|| Path::new("."));
    let md = fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !md.file_type().is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if md.uid() != me {
        return Err(format!(
            "its directory {} belongs to uid {}, not to us (uid {me})",
            dir.display(),
            md.uid()
        ));
    }
    if md.mode() & 0o777 != 0o700 {
        return Err(format!(
            "its directory {} has mode {:o}, not 700",
            dir.display(),
            md.mode() & 0o7777
        ));
    }
    let md = fs::symlink_metadata(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    if !md.file_type().is_socket() {
        return Err(format!("{} is not a socket", socket.display()));
    }
    if md.uid() != me {
        return Err(format!(
            "the socket belongs to uid {}, not to us (uid {me})",
            md.uid()
        ));
    }
    Ok(())
}

/// The pid a socket's name (`<pid>.sock`) claims.
pub fn pid_of_socket(socket: &Path) -> Option<u32> {
    socket
        .file_name()?
        .to_str()?
        .strip_suffix(".sock")?
        .parse()
        .ok()
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
    /// Why the socket is not to be trusted ([`check_trusted`]), if so.
    pub untrusted: Option<String>,
}

/// Every `<pid>.sock` in the search directories, sorted by pid.
pub fn scan() -> Vec<Found> {
    scan_dirs(&search_dirs())
}

/// Every `<pid>.sock` in `dirs`, sorted by pid (the first of a pid kept).
pub fn scan_dirs(dirs: &[PathBuf]) -> Vec<Found> {
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".sock"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let socket = entry.path();
            found.push(Found {
                pid,
                untrusted: check_trusted(&socket).err(),
                socket,
                alive: i32::try_from(pid).is_ok_and(sys::pid_alive),
            });
        }
    }
    found.sort_by_key(|f| f.pid); // stable: the first directory's first
    found.dedup_by_key(|f| f.pid);
    found
}
