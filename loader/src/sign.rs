//! Ed25519 detached plugin signatures (`plugin.so.sig`) and the keys a host
//! trusts.
//!
//! What is signed is not the whole file (up to 1 GiB) but a fixed,
//! domain-separated message: `"hotpatch plugin signature v1\0"` followed by
//! the file's SHA-256 — the digest the loader computes anyway, streaming,
//! from the same open descriptor it later checks the ELF of.
//!
//! The signature file is text:
//!
//! ```text
//! hotpatch-signature v1
//! key <64 hex digits: the Ed25519 public key>
//! sig <128 hex digits: the signature>
//! ```
//!
//! Naming the key lets the loader tell an untrusted key
//! (`E_PLG_SIG_UNTRUSTED_KEY`) from a trusted key whose signature does not
//! match (`E_PLG_SIG_INVALID`).

use std::fmt;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::digest::Sha256Digest;
use crate::error::{Error, Result};

const SIG_MAGIC: &str = "hotpatch-signature v1";
const SECRET_MAGIC: &str = "hotpatch-secret-key v1";
const CONTEXT: &[u8] = b"hotpatch plugin signature v1\0";
/// Largest signature or key file read (a real one is under 250 bytes).
const MAX_SMALL_FILE: u64 = 4096;

fn message(digest: &Sha256Digest) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(&digest.0);
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim().as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let nib = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = nib(pair[0])? << 4 | nib(pair[1])?;
    }
    Some(out)
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses 64 hex digits. `None` when they are not hex or not a valid
    /// curve point.
    pub fn from_hex(s: &str) -> Option<Self> {
        VerifyingKey::from_bytes(&unhex::<32>(s)?).ok().map(Self)
    }

    /// The key as 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Reads a public-key file: the first line that is not empty and does
    /// not start with `#` holds 64 hex digits.
    ///
    /// # Errors
    /// `E_PLG_KEY_MALFORMED` when the file is not such a key, `E_PLG_IO` when
    /// it cannot be read.
    pub fn read_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_small(path)?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or("");
        Self::from_hex(line).ok_or_else(|| Error::KeyMalformed {
            path: path.to_path_buf(),
            reason: "expected one line of 64 hex digits (an Ed25519 public key)".into(),
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// An Ed25519 signing key. Its `Debug` does not print the secret.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public())
    }
}

impl SecretKey {
    /// A new key from the kernel's random source (`/dev/urandom`).
    ///
    /// # Errors
    /// When `/dev/urandom` cannot be read.
    pub fn generate() -> std::io::Result<Self> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
        Ok(Self::from_seed(seed))
    }

    /// The key with this 32-byte seed (deterministic; for tests and
    /// re-imports).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Writes the key to `path` (created, never overwritten, mode 0600) and
    /// its public key to `path.pub` (mode 0644).
    ///
    /// # Errors
    /// When either file exists or cannot be written.
    pub fn write_files(&self, path: impl AsRef<Path>) -> std::io::Result<PathBuf> {
        let path = path.as_ref();
        let public = append_ext(path, "pub");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        writeln!(f, "{SECRET_MAGIC}\n{}", hex(&self.0.to_bytes()))?;
        f.sync_all()?;
        let mut p = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&public)?;
        writeln!(p, "{}", self.public())?;
        Ok(public)
    }

    /// Reads a key written by [`write_files`](Self::write_files). A key file
    /// that group or others can read is refused.
    ///
    /// # Errors
    /// `E_PLG_KEY_MALFORMED` when it is not such a key or is readable by
    /// others, `E_PLG_IO` when it cannot be read.
    pub fn read_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |reason: &str| Error::KeyMalformed {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        let meta = std::fs::metadata(path).map_err(|e| io(path, e))?;
        if meta.mode() & 0o077 != 0 {
            return Err(bad(&format!(
                "a secret key readable or writable by group or others (mode {:o}); run `chmod 600` on it",
                meta.mode() & 0o7777
            )));
        }
        let text = read_small(path)?;
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(SECRET_MAGIC) {
            return Err(bad("not a hotpatch secret key (first line)"));
        }
        let seed = lines
            .next()
            .and_then(unhex::<32>)
            .ok_or_else(|| bad("the second line is not 64 hex digits"))?;
        Ok(Self::from_seed(seed))
    }

    /// The signature file text for a plugin with this digest.
    pub fn signature_text(&self, digest: &Sha256Digest) -> String {
        let sig = self.0.sign(&message(digest));
        format!(
            "{SIG_MAGIC}\nkey {}\nsig {}\n",
            self.public(),
            hex(&sig.to_bytes())
        )
    }
}

fn append_ext(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Where the loader looks for the signature of `plugin`: `plugin` + `.sig`.
pub fn signature_path(plugin: impl AsRef<Path>) -> PathBuf {
    append_ext(plugin.as_ref(), "sig")
}

/// Signs the plugin at `plugin` with `key`, writing [`signature_path`]
/// (replacing an older signature). Returns the signature's path.
///
/// # Errors
/// When the plugin cannot be read or the signature cannot be written.
pub fn sign_file(plugin: impl AsRef<Path>, key: &SecretKey) -> std::io::Result<PathBuf> {
    let plugin = plugin.as_ref();
    let digest = Sha256Digest::of_file(plugin)?;
    let out = signature_path(plugin);
    let tmp = append_ext(&out, "tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(key.signature_text(&digest).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// Opens `path` for reading without blocking (a FIFO planted where a
/// signature or key is expected must not hang the host) and refuses
/// anything but a regular file.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_small(path: &Path) -> Result<String> {
    let f = open_regular(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidInput {
            Error::KeyMalformed {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        } else {
            io(path, e)
        }
    })?;
    let mut bytes = Vec::new();
    f.take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io(path, e))?;
    if bytes.len() as u64 > MAX_SMALL_FILE {
        return Err(Error::KeyMalformed {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_SMALL_FILE} bytes"),
        });
    }
    String::from_utf8(bytes).map_err(|_| Error::KeyMalformed {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })
}

/// A parsed signature file.
#[derive(Debug, Clone)]
pub(crate) struct SigFile {
    pub key: [u8; 32],
    pub sig: Signature,
}

/// Reads `plugin.sig`: `Ok(None)` when there is none.
pub(crate) fn read_signature(plugin: &Path) -> Result<Option<SigFile>> {
    let path = signature_path(plugin);
    let malformed = |reason: String| Error::SigMalformed {
        path: plugin.to_path_buf(),
        sig: path.clone(),
        reason,
    };
    let f = match open_regular(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(malformed(e.to_string()));
        }
        Err(e) => return Err(io(&path, e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io(&path, e))?;
    if bytes.len() as u64 > MAX_SMALL_FILE {
        return Err(malformed(format!("larger than {MAX_SMALL_FILE} bytes")));
    }
    let text = String::from_utf8(bytes).map_err(|_| malformed("not UTF-8 text".into()))?;
    let mut lines = text.lines().map(str::trim);
    if lines.next() != Some(SIG_MAGIC) {
        return Err(malformed(format!("the first line is not `{SIG_MAGIC}`")));
    }
    let key = lines
        .next()
        .and_then(|l| l.strip_prefix("key "))
        .and_then(unhex::<32>)
        .ok_or_else(|| malformed("the second line is not `key <64 hex digits>`".into()))?;
    let sig = lines
        .next()
        .and_then(|l| l.strip_prefix("sig "))
        .and_then(unhex::<64>)
        .ok_or_else(|| malformed("the third line is not `sig <128 hex digits>`".into()))?;
    if lines.any(|l| !l.is_empty()) {
        return Err(malformed("text after the signature".into()));
    }
    Ok(Some(SigFile {
        key,
        sig: Signature::from_bytes(&sig),
    }))
}

/// Checks `sig` for a file with `digest` against `trusted`.
pub(crate) fn verify(
    plugin: &Path,
    sig: &SigFile,
    digest: &Sha256Digest,
    trusted: &[PublicKey],
) -> Result<PublicKey> {
    let Some(key) = trusted.iter().find(|k| k.to_bytes() == sig.key) else {
        return Err(Error::SigUntrustedKey {
            path: plugin.to_path_buf(),
            key: hex(&sig.key),
        });
    };
    key.0
        .verify_strict(&message(digest), &sig.sig)
        .map_err(|_| Error::SigInvalid {
            path: plugin.to_path_buf(),
            key: key.to_string(),
            actual: *digest,
        })?;
    Ok(*key)
}

/// `$XDG_CONFIG_HOME/hotpatch/trusted-keys` (or `~/.config/...` when
/// `XDG_CONFIG_HOME` is unset or not absolute); `None` without a home.
pub fn default_key_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("hotpatch").join("trusted-keys"))
}

/// Reads every `*.pub` file of a trusted-keys directory.
///
/// The directory gets the loader's rules for plugin paths: it, and each
/// directory above it, must be owned by root or by us and not writable by
/// other users (a directory above may be world-writable with the sticky bit,
/// like `/tmp`; the key directory itself may not be group- or
/// world-writable at all), and so must each key file. Otherwise anyone could
/// make the host trust their key: `E_PLG_UNSAFE_OWNER` or `E_PLG_PERMISSION`.
/// A directory that does not exist holds no keys.
///
/// # Errors
/// As above; `E_PLG_KEY_MALFORMED` for a key file that is not a key.
pub fn read_key_dir(dir: impl AsRef<Path>) -> Result<Vec<PublicKey>> {
    let dir = dir.as_ref();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir, e)),
    };
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Error::WritableByOthers {
            path: dir.to_path_buf(),
            mode,
        });
    }
    if let Some(e) = crate::owner::ownership(dir, &meta)? {
        return Err(e);
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    names.sort();
    let mut keys = Vec::with_capacity(names.len());
    for p in names {
        let m = std::fs::metadata(&p).map_err(|e| io(&p, e))?;
        let mode = m.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(Error::WritableByOthers { path: p, mode });
        }
        if let Some(e) = crate::owner::ownership(&p, &m)? {
            return Err(e);
        }
        keys.push(PublicKey::read_file(&p)?);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip() {
        let k = SecretKey::from_seed([7; 32]);
        let d = Sha256Digest::of(b"plugin bytes");
        let text = k.signature_text(&d);
        let dir = std::env::temp_dir().join(format!("hp-sign-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let plugin = dir.join("p.so");
        std::fs::write(signature_path(&plugin), &text).expect("write");
        let sig = read_signature(&plugin).expect("read").expect("present");
        assert!(verify(&plugin, &sig, &d, &[k.public()]).is_ok());
        let other = Sha256Digest::of(b"other bytes");
        let e = verify(&plugin, &sig, &other, &[k.public()]).expect_err("tampered");
        assert_eq!(e.code(), "E_PLG_SIG_INVALID");
        let stranger = SecretKey::from_seed([8; 32]).public();
        let e = verify(&plugin, &sig, &d, &[stranger]).expect_err("untrusted");
        assert_eq!(e.code(), "E_PLG_SIG_UNTRUSTED_KEY");
        std::fs::write(signature_path(&plugin), "hotpatch-signature v1\nkey zz\n").expect("w");
        let e = read_signature(&plugin).expect_err("malformed");
        assert_eq!(e.code(), "E_PLG_SIG_MALFORMED");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn public_key_hex_round_trips() {
        let k = SecretKey::from_seed([1; 32]).public();
        assert_eq!(PublicKey::from_hex(&k.to_string()), Some(k));
        assert_eq!(PublicKey::from_hex("12"), None);
    }
}
