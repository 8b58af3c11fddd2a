//! The symbolizer's error type and its stable codes.

use std::path::PathBuf;

use crate::model::ModuleId;

/// Everything the symbolizer can refuse or fail at.
///
/// Each variant has a stable, machine-readable [`code`](Error::code) that
/// callers (the loader, the CLI, the agent's JSON replies) pass on unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or mapping a file failed; the OS error is the source.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an ELF file at all (bad magic, or not ELF64 x86-64).
    #[error("{}: not an ELF64 file: {reason}", path.display())]
    NotElf {
        /// The file involved.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The file starts like an ELF file but its headers or a section point
    /// outside the file (truncated or corrupted).
    #[error("{}: truncated or corrupted ELF: {reason}", path.display())]
    Truncated {
        /// The file involved.
        path: PathBuf,
        /// What was out of bounds.
        reason: String,
    },
    /// DWARF was present but could not be parsed.
    #[error("{}: bad DWARF: {reason}", path.display())]
    BadDwarf {
        /// The file holding the DWARF.
        path: PathBuf,
        /// gimli's description.
        reason: String,
    },
    /// Neither the file nor any separate debug file has DWARF line info.
    #[error("{}: no debug info found (file, build-id, debuglink)", path.display())]
    NoDebugInfo {
        /// The module's file.
        path: PathBuf,
    },
    /// A separate debug file was found but its build-id (or debuglink CRC)
    /// does not match the module, so it was rejected.
    #[error("{}: debug file {} does not match: {reason}", path.display(), debug_file.display())]
    BuildIdMismatch {
        /// The module's file.
        path: PathBuf,
        /// The rejected debug file.
        debug_file: PathBuf,
        /// Which check failed (build-id or CRC).
        reason: String,
    },
    /// No module with this id is known to the registry.
    #[error("unknown module {0:?}")]
    UnknownModule(ModuleId),
    /// The module is already unregistered.
    #[error("module {0:?} is already unregistered")]
    AlreadyUnloaded(ModuleId),
    /// The module is pinned (a live patch site jumps into it) and cannot be
    /// unregistered; the loader maps this to `E_PLG_IN_USE`.
    #[error("module {id:?} is pinned by {pins} live patch site(s)")]
    ModulePinned {
        /// The module.
        id: ModuleId,
        /// How many pins are held.
        pins: u64,
    },
    /// `unpin` without a matching `pin`.
    #[error("module {0:?} is not pinned")]
    NotPinned(ModuleId),
    /// No loaded object contains the address or has the path that an
    /// [`ElfModuleSpec`](crate::registry::ElfModuleSpec) named.
    #[error("no loaded object matches {0}")]
    NotMapped(String),
    /// The anonymous range is empty or wraps around the address space.
    #[error("invalid range {start:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the range.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// A registry subscriber tried to mutate the registry from inside its
    /// notification (that would deadlock).
    #[error("registry mutated from inside a subscriber callback")]
    Reentrant,
    /// The symbol was not found in `.symtab`/`.dynsym` of the module.
    #[error("symbol {name} not found in {}", path.display())]
    SymbolNotFound {
        /// The module's file.
        path: PathBuf,
        /// The name searched for.
        name: String,
    },
    /// The module is being unregistered (an
    /// [`UnregisterTicket`](crate::UnregisterTicket) is out): it cannot be
    /// pinned, nor unregistered a second time.
    #[error("module {0:?} is being unregistered")]
    Unregistering(ModuleId),
    /// The module is an anonymous range, which has no file to read.
    #[error("module {0:?} is an anonymous range, not an ELF file")]
    NotAFile(ModuleId),
}

impl Error {
    /// The stable machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io { .. } => "E_SYM_IO",
            Error::NotElf { .. } => "E_SYM_NOT_ELF",
            Error::Truncated { .. } => "E_SYM_TRUNCATED",
            Error::BadDwarf { .. } => "E_SYM_BAD_DWARF",
            Error::NoDebugInfo { .. } => "E_SYM_NO_DEBUG_INFO",
            Error::BuildIdMismatch { .. } => "E_SYM_BUILD_ID_MISMATCH",
            Error::UnknownModule(_) => "E_SYM_UNKNOWN_MODULE",
            Error::AlreadyUnloaded(_) => "E_SYM_ALREADY_UNLOADED",
            Error::ModulePinned { .. } => "E_SYM_MODULE_PINNED",
            Error::NotPinned(_) => "E_SYM_NOT_PINNED",
            Error::NotMapped(_) => "E_SYM_NOT_MAPPED",
            Error::InvalidRange { .. } => "E_SYM_INVALID_RANGE",
            Error::Reentrant => "E_SYM_REENTRANT",
            Error::SymbolNotFound { .. } => "E_SYM_SYMBOL_NOT_FOUND",
            Error::NotAFile(_) => "E_SYM_NOT_A_FILE",
            Error::Unregistering(_) => "E_SYM_UNREGISTERING",
        }
    }
}

/// The symbolizer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
