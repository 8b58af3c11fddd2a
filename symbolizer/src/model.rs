//! The registry's model types: module ids, sequence numbers, build-ids,
//! segments and TLS facts. Plain data, no behaviour beyond arithmetic on
//! themselves; every other file of the crate may use them (the registry's
//! records and table, the ELF reader, the file table, the errors) without
//! depending on the registry itself.

use std::fmt;

use hotpatch_sys::phdr;

use crate::addr::{FileOffset, FileVirtAddr};

pub use hotpatch_sys::phdr::TlsSegment;

/// Identifies a module within one [`Registry`](crate::Registry); never reused.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize)]
pub struct ModuleId(pub u64);

/// A registry sequence number: the count of mutations so far.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, serde::Serialize)]
pub struct Seq(pub u64);

impl Seq {
    /// "Whatever is mapped now": later than any real sequence number.
    pub const LATEST: Seq = Seq(u64::MAX - 1);
}

/// A GNU build-id (`NT_GNU_BUILD_ID` note contents).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BuildId(pub Vec<u8>);

impl BuildId {
    /// Lower-case hex, as `readelf -n` and `/usr/lib/debug/.build-id` spell it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuildId({})", self.to_hex())
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One `PT_LOAD` segment of an ELF module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// `p_vaddr`.
    pub vaddr: FileVirtAddr,
    /// `p_memsz`.
    pub memsz: u64,
    /// `p_offset`.
    pub offset: FileOffset,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_flags` (`PF_X`, `PF_W`, `PF_R`).
    pub flags: u32,
}

impl Segment {
    /// Whether the segment is executable.
    pub fn is_exec(&self) -> bool {
        self.flags & libc::PF_X != 0
    }

    /// The file offset of `addr`, if it lies in this segment's file-backed
    /// part.
    pub fn file_offset(&self, addr: FileVirtAddr) -> Option<FileOffset> {
        let delta = addr.0.checked_sub(self.vaddr.0)?;
        (delta < self.filesz).then(|| FileOffset(self.offset.0 + delta))
    }
}

impl From<phdr::Segment> for Segment {
    fn from(s: phdr::Segment) -> Segment {
        Segment {
            vaddr: FileVirtAddr(s.vaddr),
            memsz: s.memsz,
            offset: FileOffset(s.offset),
            filesz: s.filesz,
            flags: s.flags,
        }
    }
}

/// A module's `PT_TLS` segment and its TLS module id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// `dlpi_tls_modid` (0 when unknown, e.g. registered from the file).
    pub modid: u64,
    /// The `PT_TLS` segment (the same type the loader reads from a file).
    pub segment: TlsSegment,
}
