//! SHA-256 digests of plugin files.

use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let out = Sha256::digest(bytes);
        let mut d = [0u8; 32];
        d.copy_from_slice(&out);
        Self(d)
    }

    /// The digest of the file at `path`.
    ///
    /// # Errors
    /// When the file cannot be read.
    pub fn of_file(path: impl AsRef<Path>) -> std::io::Result<Self> {
        Self::of_reader(std::fs::File::open(path)?)
    }

    /// The digest of everything `r` yields, read in 64 KiB pieces (no
    /// buffer the size of the input).
    ///
    /// # Errors
    /// When reading fails.
    pub fn of_reader(mut r: impl std::io::Read) -> std::io::Result<Self> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => h.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut d = [0u8; 32];
        d.copy_from_slice(&h.finalize());
        Ok(Self(d))
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.trim().as_bytes();
        if s.len() != 64 {
            return None;
        }
        let nib = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
        let mut d = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            d[i] = nib(pair[0])? << 4 | nib(pair[1])?;
        }
        Some(Self(d))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}
