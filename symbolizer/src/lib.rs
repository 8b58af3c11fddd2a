//! Module registry and address resolution for hotpatch.
//!
//! Two halves:
//!
//! * [`registry`]: which module (ELF file or named anonymous code range) was
//!   mapped at which address *at which time* (registry sequence number).
//!   Lookups are lock-free and allocation-free, usable from a signal handler.
//! * resolution ([`Symbolizer`]): turns `(pc, seq)` or file virtual addresses
//!   into frames (function, file, line; inline frames innermost first) using
//!   DWARF from the file or a separate debug file, falling back to the symbol
//!   tables and then to `module+0xOFFSET`.
//!
//! Addresses are typed ([`RuntimeAddr`], [`FileVirtAddr`], [`FileOffset`]);
//! errors carry stable codes ([`Error::code`]).

pub mod addr;
mod demangle;
mod dwarf;
pub mod dwarf_check;
pub mod elf;
pub mod error;
mod files;
pub mod find;
mod model;
pub mod perf_map;
pub mod registry;
pub mod resolve;
pub mod signature;
pub mod signatures_in;
mod vdso;

pub use addr::{Bias, FileOffset, FileVirtAddr, RuntimeAddr};
pub use demangle::demangle;
pub use error::{Error, Result};
pub use registry::{ElfModuleSpec, Event, Hit, Module, ModuleId, Registry, Seq, UnregisterTicket};
pub use resolve::{
    DebugInfo, DebugSearch, ElfSymbolizer, Frame, Resolved, Source, SymbolAddr, Symbolizer,
};
