//! The registry's records: what a module is ([`Module`], [`ElfModule`],
//! [`AnonRange`]), how it was learned of ([`Origin`]), how a caller names an
//! ELF module to register ([`ElfModuleSpec`]), and what subscribers are told
//! ([`Event`]). Plain data: the table and the mutations live next door
//! (`table.rs`, `mod.rs`); this file names neither.

use std::path::PathBuf;
use std::sync::Arc;

use crate::addr::{Bias, RuntimeAddr};
use crate::elf::Mapped;
use crate::files::FileSlot;
use crate::model::{BuildId, ModuleId, Segment, Seq, TlsInfo};

/// Identifies a subscription made with [`Registry::subscribe`](super::Registry::subscribe).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SubscriptionId(pub(super) u64);

/// A file-backed ELF module.
#[derive(Clone, Debug)]
pub struct ElfModule {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Its build-id, if it has one.
    pub build_id: Option<BuildId>,
    /// Its load bias.
    pub bias: Bias,
    /// Its `PT_LOAD` segments.
    pub segments: Vec<Segment>,
    /// Its TLS segment, if any.
    pub tls: Option<TlsInfo>,
    /// The file version mapped when the module was registered, so a plugin
    /// rebuilt later still resolves against the bytes that were loaded.
    /// Shared by every module loaded from the same version (see
    /// [`crate::files`]).
    pub(crate) file: Option<Arc<FileSlot>>,
}

impl ElfModule {
    /// The bytes the module was loaded from, if still held.
    pub(crate) fn mapped(&self) -> Option<Arc<Mapped>> {
        self.file.as_ref().and_then(|f| f.mapped())
    }

    /// The runtime ranges of its executable segments.
    pub fn exec_ranges(&self) -> impl Iterator<Item = (RuntimeAddr, RuntimeAddr)> + '_ {
        self.segments.iter().filter(|s| s.is_exec()).map(|s| {
            let start = self.bias.to_runtime(s.vaddr);
            (start, RuntimeAddr(start.0.wrapping_add(s.memsz)))
        })
    }
}

/// A named range of anonymous code (trampoline, relay, JIT code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnonRange {
    /// The name frames in it resolve to, e.g. `hotpatch::trampoline<price>`.
    pub name: String,
    /// First byte.
    pub start: RuntimeAddr,
    /// Length in bytes (> 0).
    pub len: u64,
}

/// What a module is.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ModuleKind {
    /// A file-backed ELF object.
    Elf(Arc<ElfModule>),
    /// Anonymous code with a name.
    Anon(Arc<AnonRange>),
}

/// How the registry learned of a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// From a `dl_iterate_phdr` snapshot.
    Snapshot,
    /// From an explicit [`Registry::register_elf`](super::Registry::register_elf).
    Explicit,
    /// From [`Registry::register_anon`](super::Registry::register_anon).
    Anonymous,
}

/// A module and its history.
#[derive(Clone, Debug)]
pub struct Module {
    /// Its id.
    pub id: ModuleId,
    /// ELF file or anonymous range.
    pub kind: ModuleKind,
    /// How the registry learned of it.
    pub origin: Origin,
    /// The sequence number at which it became mapped.
    pub loaded_seq: Seq,
    /// The sequence number at which it was unmapped; `None` while mapped.
    pub unloaded_seq: Option<Seq>,
    /// Live pins (patch sites jumping into it).
    pub pins: u64,
}

impl Module {
    /// A short display name: the file name or the anonymous range's name.
    pub fn name(&self) -> String {
        match &self.kind {
            ModuleKind::Elf(e) => e
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| e.path.display().to_string()),
            ModuleKind::Anon(a) => a.name.clone(),
        }
    }

    /// Whether it was mapped at `seq`.
    pub fn mapped_at(&self, seq: Seq) -> bool {
        self.loaded_seq <= seq && self.unloaded_seq.is_none_or(|u| seq < u)
    }

    /// The ELF part, if it is a file-backed module.
    pub fn elf(&self) -> Option<&Arc<ElfModule>> {
        match &self.kind {
            ModuleKind::Elf(e) => Some(e),
            ModuleKind::Anon(_) => None,
        }
    }
}

/// What a subscriber is told.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The module was registered (sent after the fact).
    Loaded(&'a Module),
    /// The module is about to be unregistered: lookups still see it mapped.
    /// The profiler checkpoints here.
    Unloading(&'a Module),
}

pub(super) type Callback = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// How [`Registry::register_elf`](super::Registry::register_elf) finds the module's load address.
#[derive(Clone, Debug)]
pub struct ElfModuleSpec {
    pub(super) path: Option<PathBuf>,
    pub(super) locate: Locate,
}

#[derive(Clone, Debug)]
pub(super) enum Locate {
    Mapped,
    Containing(RuntimeAddr),
    File(Bias),
}

impl ElfModuleSpec {
    /// A mapped object found by its path in the loader's list (compared after
    /// canonicalization). The loader uses this after `dlopen(path)`.
    pub fn mapped(path: impl Into<PathBuf>) -> Self {
        ElfModuleSpec {
            path: Some(path.into()),
            locate: Locate::Mapped,
        }
    }

    /// The mapped object one of whose segments contains `addr` (e.g. a
    /// `dlsym` result).
    pub fn containing(addr: RuntimeAddr) -> Self {
        ElfModuleSpec {
            path: None,
            locate: Locate::Containing(addr),
        }
    }

    /// An ELF file assumed loaded at `bias`, its layout read from the file
    /// (no `PT_TLS` module id). For objects mapped by other means.
    pub fn file(path: impl Into<PathBuf>, bias: Bias) -> Self {
        ElfModuleSpec {
            path: Some(path.into()),
            locate: Locate::File(bias),
        }
    }
}
