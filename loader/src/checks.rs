//! Everything checked before any plugin code runs: the file, its digest, its
//! ELF header and its ABI descriptor, and the entry points in its dynamic
//! symbol table.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use hotpatch_plugin_api as api;
use hotpatch_plugin_api::AbiDescriptor;

use object::ReadRef as _;
use object::read::ReadCache;

use crate::elf::{self, ElfError, ElfInfo};
use crate::error::{Error, Result};
use crate::owner::{euid, io_error, ownership};
use crate::policy::{AllowCheck, Policy, Sha256Digest};

/// Identity of a file: `(st_dev, st_ino)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// A file that passed every static check.
#[derive(Debug)]
pub(crate) struct Checked {
    pub file: FileId,
    pub info: ElfInfo,
    pub descriptor: AbiDescriptor,
    pub digest: Option<Sha256Digest>,
}

/// An OS error about the path itself (NUL byte, name too long, symlink
/// loop) rather than about the file or the disk.
/// The largest file `load` takes: 1 GiB. Larger than any plugin (the
/// biggest Rust `cdylib` with full debug info we know of is a few hundred
/// MiB), small enough that hashing it for the allowlist takes seconds, not
/// hours. A bigger file is refused with `E_PLG_TOO_LARGE` before any byte of
/// it is read.
pub const MAX_PLUGIN_SIZE: u64 = 1 << 30;

/// Runs the checks in the crate docs' order: file, integrity, ELF, descriptor,
/// entry points.
pub(crate) fn check(path: &Path, policy: &Policy) -> Result<Checked> {
    let p = || path.to_path_buf();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound | ErrorKind::NotADirectory => Error::NotFound {
            path: p(),
            reason: "no such file".into(),
            source: Some(e),
        },
        ErrorKind::PermissionDenied => Error::Unreadable {
            path: p(),
            uid: euid(),
            source: e,
        },
        _ => io_error(path, e),
    })?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Error::NotFound {
            path: p(),
            reason: format!("the path is {what}"),
            source: None,
        });
    }
    let file = File::open(path).map_err(|e| match e.kind() {
        ErrorKind::PermissionDenied => Error::Unreadable {
            path: p(),
            uid: euid(),
            source: e,
        },
        ErrorKind::NotFound => Error::NotFound {
            path: p(),
            reason: "removed while loading".into(),
            source: Some(e),
        },
        _ => io_error(path, e),
    })?;
    // From here on, everything is read through the open descriptor: the
    // checks below all see the same inode.
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    let size = meta.len();
    if size > MAX_PLUGIN_SIZE {
        return Err(Error::TooLarge {
            path: p(),
            size,
            limit: MAX_PLUGIN_SIZE,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Error::WritableByOthers { path: p(), mode });
    }
    let id = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let unsafe_owner = ownership(path, &meta)?;

    let digest = content(path, &file, policy, unsafe_owner)?;

    let cache = ReadCache::new(&file);
    let info = elf::parse(&cache, size, api::SECTION).map_err(|e| match e {
        ElfError::NotElf(reason) => Error::NotElf { path: p(), reason },
        ElfError::WrongArch(found) => Error::WrongArch { path: p(), found },
        ElfError::Truncated(reason) => Error::Truncated { path: p(), reason },
    })?;
    let descriptor = read_descriptor(path, &cache, &info)?;
    compare_descriptor(path, &descriptor)?;
    if let Some(req) = crate::req::read_requirements(path, &file)? {
        crate::req::check(path, &req, &policy.host)?;
    }
    for symbol in [
        api::ENTRY_ON_LOAD,
        api::ENTRY_ON_INIT,
        api::ENTRY_ON_SHUTDOWN,
    ] {
        if !info.defines_function(symbol) {
            return Err(Error::SymbolMissing {
                path: p(),
                symbol: symbol.into(),
            });
        }
    }
    Ok(Checked {
        file: id,
        info,
        descriptor,
        digest,
    })
}

/// The content checks: allowlist and signature, under the policy's rules
/// (see [`Policy`]). Returns the digest when it was computed. An allowlisted
/// digest or a valid trusted signature vouches for the content wherever it
/// lies, so `unsafe_owner` is only returned when neither does.
fn content(
    path: &Path,
    file: &File,
    policy: &Policy,
    unsafe_owner: Option<Error>,
) -> Result<Option<Sha256Digest>> {
    let p = || path.to_path_buf();
    let sig = crate::sign::read_signature(path)?;
    if policy.allowlist.is_none() && sig.is_none() && !policy.require_signature {
        return match unsafe_owner {
            Some(e) => Err(e),
            None => Ok(None),
        };
    }
    let actual = Sha256Digest::of_reader(file).map_err(|e| io_error(path, e))?;
    // A present signature is always checked, whatever the policy requires.
    let signed = match &sig {
        Some(s) => {
            crate::sign::verify(path, s, &actual, &policy.trusted)?;
            true
        }
        None => false,
    };
    let allow = policy.allowlist.as_ref().map(|list| {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        list.check(&name, actual)
    });
    let allowed = matches!(allow, Some(AllowCheck::Allowed));
    let vouched = allowed || signed;
    let allow_error = || match allow {
        Some(AllowCheck::Tampered(expected)) => Some(Error::Integrity {
            path: p(),
            expected,
            actual,
        }),
        Some(AllowCheck::Unknown) => Some(Error::NotAllowed { path: p(), actual }),
        _ => None,
    };
    let sig_missing = |either: &'static str| Error::SigMissing {
        path: p(),
        sig: crate::sign::signature_path(path),
        either,
    };
    if policy.either && policy.require_signature && policy.allowlist.is_some() {
        if !vouched {
            return Err(sig_missing(
                " (or allowlist its SHA-256, which is not listed either)",
            ));
        }
    } else {
        if policy.require_signature && !signed {
            return Err(sig_missing(""));
        }
        if let Some(e) = allow_error() {
            // As before signatures: an unsafe location is reported first
            // when the allowlist does not vouch for the file.
            return Err(unsafe_owner.unwrap_or(e));
        }
    }
    if let (Some(e), false) = (unsafe_owner, vouched) {
        return Err(e);
    }
    Ok(Some(actual))
}

fn read_descriptor(path: &Path, file: &ReadCache<&File>, info: &ElfInfo) -> Result<AbiDescriptor> {
    let no_abi = |reason: Option<String>| Error::NoAbi {
        path: path.to_path_buf(),
        reason,
    };
    let (start, len) = info.section.ok_or_else(|| no_abi(None))?;
    if len > 4096 {
        return Err(no_abi(Some(format!(
            "the section is {len} bytes, a descriptor is {}",
            api::DESCRIPTOR_SIZE
        ))));
    }
    let section = file
        .read_bytes_at(start, len)
        .map_err(|()| no_abi(Some("the section cannot be read".into())))?;
    let d = AbiDescriptor::from_bytes(section).ok_or_else(|| {
        no_abi(Some(format!(
            "the section is {len} bytes, a descriptor is {}",
            api::DESCRIPTOR_SIZE
        )))
    })?;
    if d.magic != api::ABI_MAGIC {
        return Err(no_abi(Some(
            "the section does not start with the descriptor magic".into(),
        )));
    }
    Ok(d)
}

fn compare_descriptor(path: &Path, d: &AbiDescriptor) -> Result<()> {
    let mismatch = |field: &'static str, expected: String, found: String| Error::AbiMismatch {
        path: PathBuf::from(path),
        field,
        expected,
        found,
    };
    if d.abi_major != api::ABI_MAJOR {
        return Err(mismatch(
            "abi_major",
            api::ABI_MAJOR.to_string(),
            d.abi_major.to_string(),
        ));
    }
    if d.descriptor_size as usize != api::DESCRIPTOR_SIZE {
        return Err(mismatch(
            "descriptor_size",
            api::DESCRIPTOR_SIZE.to_string(),
            d.descriptor_size.to_string(),
        ));
    }
    if d.abi_minor > api::ABI_MINOR {
        return Err(mismatch(
            "abi_minor",
            format!("<= {}", api::ABI_MINOR),
            d.abi_minor.to_string(),
        ));
    }
    if d.rustc_version_str() != api::RUSTC_VERSION {
        return Err(mismatch(
            "rustc_version",
            api::RUSTC_VERSION.into(),
            d.rustc_version_str().into(),
        ));
    }
    if d.layout_size != api::LAYOUT_SIZE {
        return Err(mismatch(
            "layout_size",
            api::LAYOUT_SIZE.to_string(),
            d.layout_size.to_string(),
        ));
    }
    if d.layout_hash != api::LAYOUT_HASH {
        return Err(mismatch(
            "layout_hash",
            format!("{:#018x}", api::LAYOUT_HASH),
            format!("{:#018x}", d.layout_hash),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_fields_are_compared() {
        let p = Path::new("x.so");
        assert!(compare_descriptor(p, &AbiDescriptor::current("x", "1")).is_ok());
        let mut d = AbiDescriptor::current("x", "1");
        d.rustc_version = [0; 128];
        d.rustc_version[..17].copy_from_slice(b"rustc 0.0.1 (old)");
        let e = compare_descriptor(p, &d).expect_err("rustc differs");
        assert!(
            matches!(
                e,
                Error::AbiMismatch {
                    field: "rustc_version",
                    ..
                }
            ),
            "{e}"
        );
        let mut d = AbiDescriptor::current("x", "1");
        d.layout_hash ^= 1;
        let e = compare_descriptor(p, &d).expect_err("layout differs");
        assert_eq!(e.code(), "E_ABI_MISMATCH");
        let mut d = AbiDescriptor::current("x", "1");
        d.abi_minor += 1;
        assert!(compare_descriptor(p, &d).is_err());
    }
}
