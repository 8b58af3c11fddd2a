//! The loader's error type: one variant per failure, each with a stable code.

use std::io;
use std::path::PathBuf;

use crate::digest::Sha256Digest;

/// The policy requires a signature; the plugin has none.
pub const E_PLG_SIG_MISSING: &str = "E_PLG_SIG_MISSING";
/// `PLUGIN.sig` is not a hotpatch signature.
pub const E_PLG_SIG_MALFORMED: &str = "E_PLG_SIG_MALFORMED";
/// A trusted key's signature does not match the file.
pub const E_PLG_SIG_INVALID: &str = "E_PLG_SIG_INVALID";
/// The signing key is not trusted.
pub const E_PLG_SIG_UNTRUSTED_KEY: &str = "E_PLG_SIG_UNTRUSTED_KEY";
/// A key file cannot be used.
pub const E_PLG_KEY_MALFORMED: &str = "E_PLG_KEY_MALFORMED";
/// The host-API version is outside the plugin's range.
pub const E_PLG_HOST_VERSION: &str = "E_PLG_HOST_VERSION";
/// The plugin's `.hotpatch_req` section is malformed.
pub const E_PLG_REQ_MALFORMED: &str = "E_PLG_REQ_MALFORMED";
/// A shared crate's version differs between host and plugin.
pub const E_PLG_DEP_DRIFT: &str = "E_PLG_DEP_DRIFT";

/// A specialized `Result` for the loader.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which lifecycle entry point failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `on_load`.
    OnLoad,
    /// `on_init`.
    OnInit,
    /// `on_shutdown`.
    OnShutdown,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::OnLoad => "on_load",
            Self::OnInit => "on_init",
            Self::OnShutdown => "on_shutdown",
        })
    }
}

/// Why loading or unloading a plugin failed.
///
/// Match on [`Error::code`] in scripts: the codes are stable, the messages
/// are not. Each message ends with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The path does not name an existing regular file.
    #[error("{path}: plugin not found ({reason}); check the path and that the file was built")]
    NotFound {
        /// The path given to `load`.
        path: PathBuf,
        /// What was found instead.
        reason: String,
        /// The OS error, if any.
        #[source]
        source: Option<io::Error>,
    },
    /// The file cannot be read by this process.
    #[error(
        "{path}: permission denied reading the plugin; make it readable by uid {uid} (and its directories searchable)"
    )]
    Unreadable {
        /// The path given to `load`.
        path: PathBuf,
        /// The effective uid of this process.
        uid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file can be modified by users other than its owner.
    #[error(
        "{path}: plugin is writable by group or others (mode {mode:o}), so anyone could replace its code; run `chmod go-w` on it"
    )]
    WritableByOthers {
        /// The path given to `load`.
        path: PathBuf,
        /// The file's permission bits.
        mode: u32,
    },
    /// The file is larger than any plugin ([`MAX_PLUGIN_SIZE`](crate::MAX_PLUGIN_SIZE)).
    #[error(
        "{path}: {size} bytes is larger than a plugin can be ({limit} bytes); pass the plugin's .so, not another file"
    )]
    TooLarge {
        /// The path given to `load`.
        path: PathBuf,
        /// The file's length.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The file, or a directory on its real path, is owned or writable by
    /// another non-root user, who could replace the plugin's code.
    #[error(
        "{path}: {culprit} is {reason}, so that user could replace the plugin's code; keep plugins where only root and uid {euid} can write, or allowlist the file's SHA-256"
    )]
    UnsafeOwner {
        /// The path given to `load`.
        path: PathBuf,
        /// The file or directory at fault (on the resolved path).
        culprit: ShortPath,
        /// What is wrong with it (owner uid or mode).
        reason: String,
        /// The effective uid of this process.
        euid: u32,
    },
    /// A structure the loader or the dynamic loader relies on lies past the
    /// end of the file.
    #[error("{path}: the file is truncated: {reason}; copy or build the plugin again")]
    Truncated {
        /// The path given to `load`.
        path: PathBuf,
        /// Which structure, and where it ends.
        reason: String,
    },
    /// The file is not an ELF shared object.
    #[error(
        "{path}: not an ELF shared object: {reason}; pass the plugin's .so (a cdylib), not another file"
    )]
    NotElf {
        /// The path given to `load`.
        path: PathBuf,
        /// What the header says instead.
        reason: String,
    },
    /// The file is an ELF object for another architecture.
    #[error(
        "{path}: built for another architecture: {found}; rebuild the plugin for x86_64-unknown-linux-gnu"
    )]
    WrongArch {
        /// The path given to `load`.
        path: PathBuf,
        /// Class, byte order or machine found.
        found: String,
    },
    /// A `DT_NEEDED` library of the plugin cannot be found.
    #[error(
        "{path}: needs {library}, which cannot be found; install it or add its directory to the plugin's RUNPATH or LD_LIBRARY_PATH (dynamic loader: {detail})"
    )]
    MissingDependency {
        /// The path given to `load`.
        path: PathBuf,
        /// The library named in `DT_NEEDED` that is missing.
        library: String,
        /// The dynamic loader's message.
        detail: String,
    },
    /// A lifecycle entry point is not exported.
    #[error(
        "{path}: does not export `{symbol}`; declare the plugin with hotpatch_plugin_api::declare_plugin!"
    )]
    SymbolMissing {
        /// The path given to `load` (or the plugin name).
        path: PathBuf,
        /// The missing symbol.
        symbol: String,
    },
    /// The file has no `.hotpatch_abi` descriptor.
    #[error(
        "{path}: no .hotpatch_abi descriptor: not a hotpatch plugin; declare it with hotpatch_plugin_api::declare_plugin!"
    )]
    NoAbi {
        /// The path given to `load`.
        path: PathBuf,
        /// What is wrong with the section, if it exists.
        reason: Option<String>,
    },
    /// The descriptor does not match this host.
    #[error(
        "{path}: ABI mismatch in {field}: plugin has {found}, host has {expected}; rebuild the plugin with the host's compiler and hotpatch-plugin-api"
    )]
    AbiMismatch {
        /// The path given to `load`.
        path: PathBuf,
        /// Which descriptor field differs.
        field: &'static str,
        /// The host's value.
        expected: String,
        /// The plugin's value.
        found: String,
    },
    /// The file's SHA-256 differs from the allowlist entry for its name.
    #[error(
        "{path}: integrity check failed: SHA-256 is {actual}, the allowlist expects {expected}; the file was modified: restore it or update the allowlist"
    )]
    Integrity {
        /// The path given to `load`.
        path: PathBuf,
        /// The digest the allowlist has for this file name.
        expected: Sha256Digest,
        /// The file's digest.
        actual: Sha256Digest,
    },
    /// The policy has an allowlist and the file is not on it.
    #[error(
        "{path}: not on the allowlist (SHA-256 {actual}); add this digest to the policy to allow it"
    )]
    NotAllowed {
        /// The path given to `load`.
        path: PathBuf,
        /// The file's digest.
        actual: Sha256Digest,
    },
    /// The kernel refused to map the file executable.
    #[error(
        "{path}: executable mapping denied ({reason}); move the plugin to a filesystem mounted without noexec (dynamic loader: {detail})"
    )]
    ExecDenied {
        /// The path given to `load`.
        path: PathBuf,
        /// The fact that explains it (e.g. the mount is `noexec`).
        reason: String,
        /// The dynamic loader's message.
        detail: String,
    },
    /// The plugin's initial-exec TLS block does not fit the static TLS space.
    #[error(
        "{path}: its {tls_size}-byte static (initial-exec) TLS block does not fit the space left in the static TLS area; build it with -ftls-model=global-dynamic, or raise GLIBC_TUNABLES=glibc.rtld.optional_static_tls before start (dynamic loader: {detail})"
    )]
    TlsExhausted {
        /// The path given to `load`.
        path: PathBuf,
        /// Size of the plugin's `PT_TLS` block.
        tls_size: u64,
        /// The dynamic loader's message.
        detail: String,
    },
    /// A lifecycle entry point returned an error or panicked.
    #[error(
        "plugin {name}: {stage} {}: {message}; fix the plugin or its configuration",
        if *panicked { "panicked" } else { "failed" }
    )]
    InitFailed {
        /// The plugin's name.
        name: String,
        /// Which entry point.
        stage: Stage,
        /// The plugin's message.
        message: String,
        /// Whether the entry point panicked (caught in the plugin's shim).
        panicked: bool,
    },
    /// The same file, or a plugin with the same name, is already loaded.
    #[error(
        "{path}: plugin {name} is already loaded (from {loaded_from}); unload it first or use the loaded instance"
    )]
    AlreadyLoaded {
        /// The path given to `load`.
        path: PathBuf,
        /// The plugin's name.
        name: String,
        /// The path the loaded instance came from.
        loaded_from: PathBuf,
    },
    /// The plugin cannot be unloaded because the registry pins it.
    #[error(
        "plugin {name} is in use ({reason}); remove the patches that jump into it, then unload again"
    )]
    InUse {
        /// The plugin's name.
        name: String,
        /// Who holds it.
        reason: String,
    },
    /// `dlopen` failed for a reason none of the checks could pin down.
    #[error(
        "{path}: the dynamic loader refused the plugin: {detail}; run with LD_DEBUG=files,libs for details"
    )]
    DlopenFailed {
        /// The path given to `load`.
        path: PathBuf,
        /// `dlerror()`.
        detail: String,
    },
    /// The path itself cannot name a file: it contains a NUL byte, a
    /// component or the whole is longer than the system's limit
    /// (`ENAMETOOLONG`), or it has too many levels of symbolic links
    /// (`ELOOP`).
    #[error("{path}: not a usable file path: {source}; pass the plugin's real path")]
    BadPath {
        /// The path given to `load` (shortened in the message when long).
        path: ShortPath,
        /// The OS error (or `InvalidInput` for a NUL byte).
        #[source]
        source: io::Error,
    },
    /// The policy requires a signature and there is no `PLUGIN.sig` beside
    /// the plugin.
    #[error(
        "{path}: unsigned: no signature file {sig}, and the policy requires one; sign it with `hotpatch sign {path} --key KEY`{either}"
    )]
    SigMissing {
        /// The path given to `load`.
        path: PathBuf,
        /// Where the signature was looked for.
        sig: PathBuf,
        /// Extra text when an allowlisted digest would also have done.
        either: &'static str,
    },
    /// The signature file is not a hotpatch signature.
    #[error("{path}: signature file {sig} is malformed: {reason}; sign the plugin again")]
    SigMalformed {
        /// The path given to `load`.
        path: PathBuf,
        /// The signature file.
        sig: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The signature was made by a trusted key but does not match the file.
    #[error(
        "{path}: the signature by trusted key {key} does not match the file (SHA-256 {actual}): the plugin or its signature was modified; restore it or sign it again"
    )]
    SigInvalid {
        /// The path given to `load`.
        path: PathBuf,
        /// The signing key (hex).
        key: String,
        /// The file's digest.
        actual: Sha256Digest,
    },
    /// The signature was made by a key the host does not trust.
    #[error(
        "{path}: signed by key {key}, which this host does not trust; add its public key to the policy or to the trusted-keys directory"
    )]
    SigUntrustedKey {
        /// The path given to `load`.
        path: PathBuf,
        /// The signing key (hex).
        key: String,
    },
    /// A key file (trusted public key or secret key) cannot be used.
    #[error("{path}: not a usable hotpatch key: {reason}; generate keys with `hotpatch keygen`")]
    KeyMalformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The plugin needs a host-API version this host does not have.
    #[error(
        "{path}: needs host API {required}, this host has {host}; build the plugin against this host's API or run it in a matching host"
    )]
    HostVersion {
        /// The path given to `load`.
        path: PathBuf,
        /// The plugin's semver range.
        required: String,
        /// The host's API version.
        host: String,
    },
    /// The plugin's `.hotpatch_req` section cannot be read.
    #[error(
        "{path}: malformed .hotpatch_req section: {reason}; rebuild the plugin with declare_plugin!"
    )]
    ReqMalformed {
        /// The path given to `load`.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A crate shared across the boundary resolved to another version (or
    /// checksum) in the plugin's build than in the host's.
    #[error(
        "{path}: built against other versions of shared crates than this host:\n{table}rebuild the plugin with the host's lock file"
    )]
    DependencyDrift {
        /// The path given to `load`.
        path: PathBuf,
        /// The crates that differ.
        table: crate::drift::DriftTable,
    },
    /// Reading the file failed for another reason.
    #[error("{path}: I/O error while reading the plugin: {source}; check the disk and retry")]
    Io {
        /// The path given to `load`.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The stable, machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "E_PLG_NOT_FOUND",
            Self::Unreadable { .. } | Self::WritableByOthers { .. } => "E_PLG_PERMISSION",
            Self::TooLarge { .. } => "E_PLG_TOO_LARGE",
            Self::UnsafeOwner { .. } => "E_PLG_UNSAFE_OWNER",
            Self::Truncated { .. } => "E_PLG_TRUNCATED",
            Self::NotElf { .. } => "E_PLG_NOT_ELF",
            Self::WrongArch { .. } => "E_PLG_WRONG_ARCH",
            Self::MissingDependency { .. } => "E_PLG_MISSING_DEPENDENCY",
            Self::SymbolMissing { .. } => "E_PLG_SYMBOL_MISSING",
            Self::NoAbi { .. } => "E_PLG_NO_ABI",
            Self::AbiMismatch { .. } => "E_ABI_MISMATCH",
            Self::Integrity { .. } => "E_PLG_INTEGRITY",
            Self::NotAllowed { .. } => "E_PLG_NOT_ALLOWED",
            Self::ExecDenied { .. } => "E_PLG_EXEC_DENIED",
            Self::TlsExhausted { .. } => "E_PLG_TLS_EXHAUSTED",
            Self::InitFailed { .. } => "E_PLG_INIT_FAILED",
            Self::AlreadyLoaded { .. } => "E_PLG_ALREADY_LOADED",
            Self::InUse { .. } => "E_PLG_IN_USE",
            Self::DlopenFailed { .. } => "E_PLG_DLOPEN_FAILED",
            Self::BadPath { .. } => "E_PLG_BAD_PATH",
            Self::Io { .. } => "E_PLG_IO",
            Self::SigMissing { .. } => E_PLG_SIG_MISSING,
            Self::SigMalformed { .. } => E_PLG_SIG_MALFORMED,
            Self::SigInvalid { .. } => E_PLG_SIG_INVALID,
            Self::SigUntrustedKey { .. } => E_PLG_SIG_UNTRUSTED_KEY,
            Self::KeyMalformed { .. } => E_PLG_KEY_MALFORMED,
            Self::HostVersion { .. } => E_PLG_HOST_VERSION,
            Self::ReqMalformed { .. } => E_PLG_REQ_MALFORMED,
            Self::DependencyDrift { .. } => E_PLG_DEP_DRIFT,
        }
    }
}

/// A path for messages: the first 200 bytes of a longer one, with the
/// length, so a 100 kB path does not make a 100 kB message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortPath(pub PathBuf);

impl std::fmt::Display for ShortPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::os::unix::ffi::OsStrExt;
        const SHOWN: usize = 200;
        let bytes = self.0.as_os_str().as_bytes();
        if bytes.len() <= SHOWN {
            return write!(f, "{}", String::from_utf8_lossy(bytes).escape_debug());
        }
        write!(
            f,
            "{}... ({} bytes)",
            String::from_utf8_lossy(&bytes[..SHOWN]).escape_debug(),
            bytes.len()
        )
    }
}
