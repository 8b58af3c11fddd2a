//! What the host accepts: an optional SHA-256 allowlist.

use std::path::Path;

pub use crate::digest::Sha256Digest;

#[derive(Debug, Clone)]
struct Entry {
    file_name: Option<String>,
    digest: Sha256Digest,
}

/// Which plugin files may be loaded, by content.
///
/// A file whose digest is on the list is allowed. A file that is not on the
/// list fails with `E_PLG_INTEGRITY` when the list has an entry for its file
/// name (the file was modified), and with `E_PLG_NOT_ALLOWED` otherwise.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    entries: Vec<Entry>,
}

impl Allowlist {
    /// An empty allowlist: nothing may be loaded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows any file with this digest.
    pub fn allow(mut self, digest: Sha256Digest) -> Self {
        self.entries.push(Entry {
            file_name: None,
            digest,
        });
        self
    }

    /// Allows the file named `file_name` (the last path component) with this
    /// digest; a file of that name with another digest is an integrity
    /// failure.
    pub fn allow_file(mut self, file_name: impl Into<String>, digest: Sha256Digest) -> Self {
        self.entries.push(Entry {
            file_name: Some(file_name.into()),
            digest,
        });
        self
    }

    pub(crate) fn check(&self, file_name: &str, actual: Sha256Digest) -> AllowCheck {
        if self.entries.iter().any(|e| e.digest == actual) {
            return AllowCheck::Allowed;
        }
        match self
            .entries
            .iter()
            .find(|e| e.file_name.as_deref() == Some(file_name))
        {
            Some(e) => AllowCheck::Tampered(e.digest),
            None => AllowCheck::Unknown,
        }
    }
}

pub(crate) enum AllowCheck {
    Allowed,
    Tampered(Sha256Digest),
    Unknown,
}

/// How the loader decides whether to load a plugin.
///
/// Content rules: a signature file beside the plugin (`PLUGIN.sig`) is
/// always checked against the trusted keys. [`with_allowlist`] requires an
/// allowlisted digest, [`require_signature`] a valid signature by a trusted
/// key; with both, both are required unless [`accept_either`] says one
/// suffices.
///
/// [`with_allowlist`]: Policy::with_allowlist
/// [`require_signature`]: Policy::require_signature
/// [`accept_either`]: Policy::accept_either
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub(crate) allowlist: Option<Allowlist>,
    pub(crate) trusted: Vec<crate::sign::PublicKey>,
    pub(crate) require_signature: bool,
    pub(crate) either: bool,
    pub(crate) host: crate::req::HostManifest,
}

impl Policy {
    /// File, ELF and ABI checks only; any digest is accepted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also require the file's SHA-256 to be on `allowlist`.
    pub fn with_allowlist(mut self, allowlist: Allowlist) -> Self {
        self.allowlist = Some(allowlist);
        self
    }

    /// Trusts signatures made by `key`.
    pub fn trust_key(mut self, key: crate::sign::PublicKey) -> Self {
        self.trusted.push(key);
        self
    }

    /// Trusts every key in `dir` (see [`read_key_dir`](crate::read_key_dir)
    /// for the ownership rules it must pass).
    ///
    /// # Errors
    /// As [`read_key_dir`](crate::read_key_dir).
    pub fn trust_key_dir(mut self, dir: impl AsRef<Path>) -> crate::Result<Self> {
        self.trusted.extend(crate::sign::read_key_dir(dir)?);
        Ok(self)
    }

    /// Trusts every key in `$XDG_CONFIG_HOME/hotpatch/trusted-keys/`
    /// ([`default_key_dir`](crate::default_key_dir)); none when it does not
    /// exist.
    ///
    /// # Errors
    /// As [`read_key_dir`](crate::read_key_dir).
    pub fn trust_default_key_dir(self) -> crate::Result<Self> {
        match crate::sign::default_key_dir() {
            Some(d) => self.trust_key_dir(d),
            None => Ok(self),
        }
    }

    /// The keys trusted so far.
    pub fn trusted_keys(&self) -> &[crate::sign::PublicKey] {
        &self.trusted
    }

    /// Requires a valid signature by a trusted key (`E_PLG_SIG_MISSING`
    /// without one).
    pub fn require_signature(mut self) -> Self {
        self.require_signature = true;
        self
    }

    /// With both an allowlist and [`require_signature`](Self::require_signature):
    /// a file passes when it is allowlisted *or* validly signed. A signature
    /// that is present is still checked (a bad one is refused even for an
    /// allowlisted file).
    pub fn accept_either(mut self) -> Self {
        self.either = true;
        self
    }

    /// The host's API version and shared crates, which plugins'
    /// requirements are checked against (default: API
    /// [`HOST_API_VERSION`](crate::plugin_api::HOST_API_VERSION), no shared
    /// crates recorded).
    pub fn with_host(mut self, host: crate::req::HostManifest) -> Self {
        self.host = host;
        self
    }

    /// The host manifest in force.
    pub fn host(&self) -> &crate::req::HostManifest {
        &self.host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_known_input() {
        // FIPS 180-2 test vector.
        assert_eq!(
            Sha256Digest::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn streamed_digest_is_the_digest() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            Sha256Digest::of_reader(&data[..]).expect("read"),
            Sha256Digest::of(&data)
        );
    }

    #[test]
    fn hex_round_trips() {
        let d = Sha256Digest::of(b"x");
        assert_eq!(Sha256Digest::from_hex(&d.to_string()), Some(d));
        assert_eq!(Sha256Digest::from_hex("zz"), None);
    }

    #[test]
    fn allowlist_distinguishes_tampered_from_unknown() {
        let good = Sha256Digest::of(b"good");
        let bad = Sha256Digest::of(b"bad");
        let list = Allowlist::new().allow_file("libp.so", good);
        assert!(matches!(list.check("libp.so", good), AllowCheck::Allowed));
        assert!(matches!(list.check("libp.so", bad), AllowCheck::Tampered(d) if d == good));
        assert!(matches!(list.check("other.so", bad), AllowCheck::Unknown));
    }
}
