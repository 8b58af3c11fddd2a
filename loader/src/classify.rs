//! Explains a `dlopen` failure by checking facts, not by trusting its text.
//!
//! Order: the mount (`noexec`), then every `DT_NEEDED` library resolved the
//! way the dynamic loader would, then the static-TLS flag of the object
//! together with the loader's message. Only when no fact explains the
//! failure is the message itself classified, and then only into the codes
//! whose text glibc has kept stable for decades.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::elf::{DF_STATIC_TLS, ElfInfo};
use crate::error::Error;

/// Turns a failed `dlopen(path)` with message `detail` into an [`Error`].
pub(crate) fn dlopen_failure(path: &Path, info: &ElfInfo, detail: String) -> Error {
    let path_buf = path.to_path_buf();
    if mounted_noexec(path) {
        return Error::ExecDenied {
            path: path_buf,
            reason: "the filesystem holding it is mounted noexec".into(),
            detail,
        };
    }
    if let Some(library) = info
        .needed
        .iter()
        .find(|lib| !dependency_resolvable(lib, path, info))
    {
        return Error::MissingDependency {
            path: path_buf,
            library: library.clone(),
            detail,
        };
    }
    if let Some(tls) = info.tls {
        if info.flags & DF_STATIC_TLS != 0 && detail.contains("static TLS") {
            return Error::TlsExhausted {
                path: path_buf,
                tls_size: tls.memsz,
                detail,
            };
        }
    }
    // Fallbacks on the message, after the facts above ruled out the direct
    // causes (these can come from a dependency of a dependency).
    if let Some(lib) = detail
        .split(": cannot open shared object file")
        .next()
        .filter(|_| detail.contains(": cannot open shared object file"))
        .map(|s| s.rsplit(": ").next().unwrap_or(s).trim().to_owned())
        .filter(|lib| Path::new(lib) != path)
    {
        return Error::MissingDependency {
            path: path_buf,
            library: lib,
            detail,
        };
    }
    if let Some(sym) = detail.split("undefined symbol: ").nth(1) {
        let sym = sym.split([',', ' ', '\n']).next().unwrap_or(sym).to_owned();
        return Error::SymbolMissing {
            path: path_buf,
            symbol: sym,
        };
    }
    if detail.contains("failed to map segment") && detail.contains("Operation not permitted") {
        return Error::ExecDenied {
            path: path_buf,
            reason: "the kernel refused an executable mapping (an LSM or seccomp policy)".into(),
            detail,
        };
    }
    Error::DlopenFailed {
        path: path_buf,
        detail,
    }
}

/// Whether the filesystem holding `path` is mounted `noexec`.
pub(crate) fn mounted_noexec(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid C string and `st` points to writable memory of
    // the right type; statvfs initializes it when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: statvfs returned 0, so `st` is initialized.
    let st = unsafe { st.assume_init() };
    st.f_flag & libc::ST_NOEXEC != 0
}

/// Whether the dynamic loader could find `lib`, needed by `plugin`: already
/// loaded, or present in one of the directories `ld.so` searches (RPATH,
/// `LD_LIBRARY_PATH`, RUNPATH, `ld.so.conf`, the default directories).
pub(crate) fn dependency_resolvable(lib: &str, plugin: &Path, info: &ElfInfo) -> bool {
    if lib.contains('/') {
        return Path::new(lib).is_file();
    }
    if hotpatch_sys::phdr::any_loaded(|name, _| {
        name.file_name()
            .is_some_and(|n| n.as_bytes() == lib.as_bytes())
    }) {
        return true;
    }
    search_dirs(plugin, info)
        .iter()
        .any(|d| d.join(lib).is_file())
}

fn search_dirs(plugin: &Path, info: &ElfInfo) -> Vec<PathBuf> {
    let origin = plugin
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let expand = |list: &str| -> Vec<PathBuf> {
        list.split(':')
            .filter(|s| !s.is_empty())
            .map(|s| {
                PathBuf::from(
                    s.replace("${ORIGIN}", &origin.to_string_lossy())
                        .replace("$ORIGIN", &origin.to_string_lossy()),
                )
            })
            .collect()
    };
    let mut dirs = Vec::new();
    if info.runpath.is_none() {
        if let Some(r) = &info.rpath {
            dirs.extend(expand(r));
        }
    }
    if let Ok(p) = std::env::var("LD_LIBRARY_PATH") {
        dirs.extend(expand(&p));
    }
    if let Some(r) = &info.runpath {
        dirs.extend(expand(r));
    }
    ld_so_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
    for d in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// Directories listed in an `ld.so.conf`, following `include` globs of the
/// form `dir/*.suffix`.
fn ld_so_conf(file: &Path, out: &mut Vec<PathBuf>, depth: u32) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include") {
            if depth >= 4 {
                continue;
            }
            let pattern = Path::new(pattern.trim());
            let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
                continue;
            };
            let name = name.to_string_lossy();
            let suffix = name.strip_prefix('*');
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
                    match (suffix, n) {
                        (Some(s), Some(n)) => n.ends_with(s),
                        (None, Some(n)) => n == name,
                        _ => false,
                    }
                })
                .collect();
            files.sort();
            for f in files {
                ld_so_conf(&f, out, depth + 1);
            }
        } else if line.starts_with('/') {
            out.push(PathBuf::from(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_resolves_and_a_made_up_library_does_not() {
        let info = ElfInfo::default();
        let me = Path::new("/proc/self/exe");
        assert!(dependency_resolvable("libc.so.6", me, &info));
        assert!(dependency_resolvable("libm.so.6", me, &info));
        assert!(!dependency_resolvable(
            "libhotpatch-does-not-exist.so.9",
            me,
            &info
        ));
    }

    #[test]
    fn usr_bin_is_not_noexec() {
        // The positive case needs a mount: tests/tests/loader_faults.rs.
        assert!(!mounted_noexec(Path::new("/usr/bin")));
        assert!(!mounted_noexec(Path::new("/nonexistent/x")));
    }
}
