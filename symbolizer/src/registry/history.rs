//! History export and import: resolving another process's samples (the
//! `hotpatch` CLI resolves what the agent captured, so the target never
//! loads DWARF).

use std::path::PathBuf;
use std::sync::Arc;

use super::records::{AnonRange, ElfModule, Module, ModuleKind, Origin};
use super::{ModuleRecord, Registry, canonical};
use crate::addr::{Bias, FileOffset, FileVirtAddr, RuntimeAddr};
use crate::elf::Mapped;
use crate::model::{BuildId, ModuleId, Segment, Seq, TlsInfo, TlsSegment};

/// One module's record, as sent to another process that resolves samples
/// taken here (the `hotpatch` CLI resolves what the agent captured, so the
/// target never loads DWARF). Plain data: serde-able, no file handles.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleExport {
    /// The module's id in the exporting registry (for messages only).
    pub id: u64,
    /// [`Module::loaded_seq`].
    pub loaded_seq: u64,
    /// [`Module::unloaded_seq`].
    pub unloaded_seq: Option<u64>,
    /// File or anonymous range.
    pub kind: ModuleExportKind,
}

/// What an exported module is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleExportKind {
    /// A file-backed ELF object.
    Elf(ElfExport),
    /// A named anonymous range (trampoline, relay).
    Anon {
        /// Its name.
        name: String,
        /// First byte.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// An exported ELF module: where it was loaded, from which file version.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ElfExport {
    /// The file's path (lossy UTF-8: a path that is not UTF-8 cannot be
    /// reopened by the importer and is reported as unverified).
    pub path: String,
    /// The build-id it was loaded with, lower-case hex.
    pub build_id: Option<String>,
    /// Load bias.
    pub bias: u64,
    /// `PT_LOAD` segments: `[p_vaddr, p_memsz, p_offset, p_filesz, p_flags]`.
    pub segments: Vec<[u64; 5]>,
    /// `PT_TLS`: `[modid, image vaddr, filesz, memsz, align]`.
    pub tls: Option<[u64; 5]>,
}

impl ModuleExport {
    fn of(m: &Module) -> ModuleExport {
        let kind = match &m.kind {
            ModuleKind::Elf(e) => ModuleExportKind::Elf(ElfExport {
                // A relative path means something else in the importer's
                // working directory: made absolute here when it can be.
                path: if e.path.is_relative() {
                    canonical(&e.path)
                } else {
                    e.path.clone()
                }
                .to_string_lossy()
                .into_owned(),
                build_id: e.build_id.as_ref().map(BuildId::to_hex),
                bias: e.bias.0,
                segments: e
                    .segments
                    .iter()
                    .map(|s| [s.vaddr.0, s.memsz, s.offset.0, s.filesz, u64::from(s.flags)])
                    .collect(),
                tls: e.tls.map(|t| {
                    let g = t.segment;
                    [t.modid, g.image, g.filesz, g.memsz, g.align]
                }),
            }),
            ModuleKind::Anon(a) => ModuleExportKind::Anon {
                name: a.name.clone(),
                start: a.start.0,
                len: a.len,
            },
        };
        ModuleExport {
            id: m.id.0,
            loaded_seq: m.loaded_seq.0,
            unloaded_seq: m.unloaded_seq.map(|s| s.0),
            kind,
        }
    }
}

/// A registry rebuilt from exported records ([`Registry::import_history`]).
#[derive(Debug)]
pub struct ImportedHistory {
    /// The detached registry: the records' history at their sequence
    /// numbers; never refreshed from this process's loader list.
    pub registry: Registry,
    /// Imported ELF modules whose file on disk is not the version that was
    /// loaded (other build-id, unreadable): their addresses must not be
    /// named from that file. With the reason.
    pub unverified: Vec<(ModuleId, String)>,
    /// Records refused as malformed (empty or wrapping ranges, unloaded
    /// before loaded, a bad build-id), with the reason.
    pub skipped: Vec<String>,
}

/// Most `PT_LOAD` segments accepted per imported module.
pub const MAX_IMPORT_SEGMENTS: usize = 256;
/// Longest path or name accepted in an imported record, in bytes.
pub const MAX_IMPORT_NAME: usize = 4096;

fn parse_build_id(hex: &str) -> Option<BuildId> {
    if hex.len() % 2 != 0 || hex.len() > 128 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
        .map(BuildId)
}

/// Checks an exported ELF record and turns it into a module (without its
/// file).
fn import_elf(x: &ElfExport) -> std::result::Result<ElfModule, String> {
    if x.path.len() > MAX_IMPORT_NAME {
        return Err(format!("path of {} bytes", x.path.len()));
    }
    if x.segments.len() > MAX_IMPORT_SEGMENTS {
        return Err(format!("{} segments", x.segments.len()));
    }
    let build_id = match &x.build_id {
        Some(h) => Some(parse_build_id(h).ok_or_else(|| format!("bad build-id {h:?}"))?),
        None => None,
    };
    let bias = Bias(x.bias);
    let mut segments = Vec::with_capacity(x.segments.len());
    for &[vaddr, memsz, offset, filesz, flags] in &x.segments {
        let start = bias.to_runtime(FileVirtAddr(vaddr)).0;
        if start.checked_add(memsz).is_none() {
            return Err(format!("segment {vaddr:#x}+{memsz:#x} wraps"));
        }
        let flags = u32::try_from(flags).map_err(|_| format!("segment flags {flags:#x}"))?;
        segments.push(Segment {
            vaddr: FileVirtAddr(vaddr),
            memsz,
            offset: FileOffset(offset),
            filesz,
            flags,
        });
    }
    let tls = x.tls.map(|[modid, image, filesz, memsz, align]| TlsInfo {
        modid,
        segment: TlsSegment {
            image,
            filesz,
            memsz,
            align,
        },
    });
    Ok(ElfModule {
        path: PathBuf::from(&x.path),
        build_id,
        bias,
        segments,
        tls,
        file: None,
    })
}

/// Whether the file now at `elf.path` is the version the module was loaded
/// from: its mapping if so, else why not.
fn verify_file(elf: &ElfModule) -> std::result::Result<Arc<Mapped>, String> {
    let mapped = if crate::vdso::is_vdso(&elf.path) {
        // No file: this process's vDSO, if it is the same image (checked
        // by build-id below, as for a file; the image has one, so a record
        // without one is refused).
        crate::vdso::own()
            .ok_or_else(|| format!("{}: this process has no vDSO", elf.path.display()))?
    } else {
        Mapped::open(&elf.path).map_err(|e| e.to_string())?
    };
    let obj = crate::elf::parse(&elf.path, mapped.data()).map_err(|e| e.to_string())?;
    let on_disk = crate::elf::build_id(&obj);
    match (&elf.build_id, &on_disk) {
        (Some(want), Some(have)) if want == have => Ok(mapped.clone()),
        (None, None) => Ok(mapped.clone()),
        (Some(want), Some(have)) => Err(format!(
            "{}: the file now has build-id {have}, the module was loaded with {want}",
            elf.path.display()
        )),
        (Some(want), None) => Err(format!(
            "{}: the file now has no build-id, the module was loaded with {want}",
            elf.path.display()
        )),
        (None, Some(have)) => Err(format!(
            "{}: the file now has build-id {have}, the module was loaded without one",
            elf.path.display()
        )),
    }
}

impl Registry {
    /// The records of every module mapped at some sequence number in
    /// `from ..= to` (what samples captured at those sequence numbers can
    /// resolve to), for [`import_history`](Self::import_history) in another
    /// process.
    pub fn export_history(&self, from: Seq, to: Seq) -> Vec<ModuleExport> {
        let st = self.lock_state();
        st.modules
            .iter()
            .map(|r| &r.module)
            .filter(|m| m.loaded_seq <= to && m.unloaded_seq.is_none_or(|u| u > from))
            .map(ModuleExport::of)
            .collect()
    }

    /// A detached registry holding `records`' history at their own
    /// sequence numbers, for resolving samples another process captured
    /// against its [`export_history`](Self::export_history).
    ///
    /// Each ELF module's file is opened from its path now and checked: a
    /// file whose build-id differs from the module's (or that cannot be
    /// read) is listed in [`ImportedHistory::unverified`] rather than
    /// trusted. Malformed records are skipped and listed, never an error
    /// or a panic: the records come from another process.
    pub fn import_history(records: &[ModuleExport]) -> ImportedHistory {
        let registry = Registry::new();
        let mut unverified = Vec::new();
        let mut skipped = Vec::new();
        let mut max_seq = 0u64;
        for r in records {
            if r.unloaded_seq.is_some_and(|u| u <= r.loaded_seq)
                || r.loaded_seq >= Seq::LATEST.0
                || r.unloaded_seq.is_some_and(|u| u >= Seq::LATEST.0)
            {
                skipped.push(format!(
                    "module {}: loaded at {} but unloaded at {:?}",
                    r.id, r.loaded_seq, r.unloaded_seq
                ));
                continue;
            }
            let (kind, doubt) = match &r.kind {
                ModuleExportKind::Anon { name, start, len } => {
                    if *len == 0 || start.checked_add(*len).is_none() {
                        skipped.push(format!(
                            "module {}: anonymous range {start:#x}+{len:#x}",
                            r.id
                        ));
                        continue;
                    }
                    if name.len() > MAX_IMPORT_NAME {
                        skipped.push(format!("module {}: name of {} bytes", r.id, name.len()));
                        continue;
                    }
                    let range = AnonRange {
                        name: name.clone(),
                        start: RuntimeAddr(*start),
                        len: *len,
                    };
                    (ModuleKind::Anon(Arc::new(range)), None)
                }
                ModuleExportKind::Elf(x) => match import_elf(x) {
                    Ok(mut elf) => {
                        let doubt = match verify_file(&elf) {
                            Ok(mapped) => {
                                elf.file = registry.file_slot(
                                    &elf.path,
                                    elf.build_id.as_ref(),
                                    Some(mapped),
                                );
                                None
                            }
                            Err(why) => Some(why),
                        };
                        (ModuleKind::Elf(Arc::new(elf)), doubt)
                    }
                    Err(why) => {
                        skipped.push(format!("module {}: {why}", r.id));
                        continue;
                    }
                },
            };
            let mut st = registry.lock_state();
            let id = ModuleId(st.modules.len() as u64 + 1);
            if let Some(why) = doubt {
                unverified.push((id, why));
            }
            let module = Module {
                id,
                kind,
                origin: Origin::Explicit,
                loaded_seq: Seq(r.loaded_seq),
                unloaded_seq: r.unloaded_seq.map(Seq),
                pins: 0,
            };
            max_seq = max_seq.max(r.loaded_seq).max(r.unloaded_seq.unwrap_or(0));
            if let Some(slot) = module.elf().and_then(|e| e.file.as_ref()) {
                st.files.acquire(slot);
                if module.unloaded_seq.is_some() {
                    st.files.release(slot);
                }
            }
            st.entries.insert(&module);
            st.modules.push(ModuleRecord {
                module,
                key: None,
                unregistering: false,
            });
        }
        {
            let mut st = registry.lock_state();
            st.detached = true;
            st.seq = max_seq;
            registry.publish(&mut st);
        }
        ImportedHistory {
            registry,
            unverified,
            skipped,
        }
    }
}
