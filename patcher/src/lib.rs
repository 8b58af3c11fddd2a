//! Patch sites for x86-64 Linux: replace a running function's entry with a
//! jump to a new version, retarget it atomically, disable it, and remove it
//! restoring every byte — while other threads keep calling it.
//!
//! ```text
//! T:      [endbr64]  jmp rel32 -> relay          (5 bytes; endbr64 kept)
//! relay:  jmp qword ptr [rip+slot]               (within ±2 GiB of T)
//! slot:   .quad <current destination>            (atomic 8-byte store = swap)
//! tramp:  [endbr64] <relocated prologue> jmp T+k (the callable original)
//! ```
//!
//! - [`Hook`]: the typed, safe API over function pointers.
//! - [`Site`]: the raw API over addresses (`unsafe`), e.g. for a symbol
//!   found by name.
//! - [`preflight`]: the analysis install runs, as a report.
//! - [`world`]: stop-the-world used by install and remove; relays and
//!   trampolines are registered with the symbolizer as named ranges;
//!   [`by_name`]: targets found by module and symbol name.
//!
//! Every refusal is an [`Error`] with a stable code ([`Error::code`]).
//! The safety argument is in the repository's `SAFETY.md`.

pub mod by_name;
pub mod canary;
mod code;
mod counters;
pub mod error;
mod hook;
pub mod maps;
mod near;
mod preflight;
pub mod quiesce;
mod site;
#[cfg(feature = "verify")]
pub mod verify;
pub mod world;
pub mod x86_64;

pub use canary::{Canary, Ratio};
pub use counters::{Stats, stats};
pub use error::{Code, Error, Refusal, Result};
pub use hook::{Function, Hook};
/// The address types of the patcher's API: [`RuntimeAddr`] (an address in
/// this process; `From<*const T>` and `From<usize>` make a function pointer
/// or an integer one argument) and [`FileVirtAddr`] (an ELF file's virtual
/// address, for the offline [`preflight_in_file`]).
pub use hotpatch_symbolizer::{FileVirtAddr, RuntimeAddr};
pub use preflight::{
    Overwritten, PreflightReport, preflight, preflight_bytes, preflight_in_file, preflight_in_image,
};
pub use site::{InstallOptions, Site, is_patched};
pub use x86_64::decode::ScanExtent;
