//! The symbol table and build-id of an executable (the running process's,
//! read through `/proc/PID/exe`, so a rebuilt file on disk does not matter).

use std::collections::HashMap;
use std::path::Path;

use object::{Object, ObjectSymbol, SymbolKind};

use crate::error::{E_WATCH_OBJECT, Error, Result, io};

/// One defined symbol of the executable.
#[derive(Debug, Clone, Copy)]
pub struct ExeSym {
    /// `st_value`: a file virtual address, or the offset in the TLS
    /// segment for a thread-local.
    pub value: u64,
    /// `st_size`.
    pub size: u64,
    /// `STT_FUNC`.
    pub func: bool,
    /// `STT_TLS`.
    pub tls: bool,
}

/// The defined symbols of an executable, by name, and its build-id.
#[derive(Debug, Default)]
pub struct ExeSymbols {
    /// Build-id, lower-case hex ("" when none).
    pub build_id: String,
    /// Defined symbols by (mangled) name; for a name defined several times
    /// (local symbols of several codegen units), the first.
    pub syms: HashMap<String, ExeSym>,
}

impl ExeSymbols {
    /// Reads `path`.
    ///
    /// # Errors
    /// `E_WATCH_IO`, `E_WATCH_OBJECT`.
    pub fn read(path: &Path) -> Result<ExeSymbols> {
        Self::read_filtered(path, None)
    }

    /// [`ExeSymbols::read`], keeping only the symbols named in `wanted`:
    /// the same scan of the symbol table without a `String` and a map entry
    /// for each of its (tens of thousands of) names.
    ///
    /// # Errors
    /// As [`ExeSymbols::read`].
    pub fn read_only(path: &Path, wanted: &std::collections::HashSet<&str>) -> Result<ExeSymbols> {
        Self::read_filtered(path, Some(wanted))
    }

    fn read_filtered(
        path: &Path,
        wanted: Option<&std::collections::HashSet<&str>>,
    ) -> Result<ExeSymbols> {
        let f = std::fs::File::open(path).map_err(|e| io(path.display(), e))?;
        // SAFETY: the map is read-only and private. The file is an
        // executable (ours through /proc/self/exe, or one cargo wrote):
        // cargo replaces outputs by rename/hard link, never by writing in
        // place, so its bytes do not change under the map.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io(path.display(), e))?;
        let file = object::File::parse(&*map).map_err(|e| {
            Error::new(
                E_WATCH_OBJECT,
                format!("{} does not parse: {e}", path.display()),
            )
        })?;
        let build_id = file
            .build_id()
            .ok()
            .flatten()
            .map(crate::hex::hex)
            .unwrap_or_default();
        let mut syms = HashMap::new();
        for s in file.symbols() {
            if s.is_undefined() || s.section_index().is_none() {
                continue;
            }
            let kind = s.kind();
            if !matches!(kind, SymbolKind::Text | SymbolKind::Data | SymbolKind::Tls) {
                continue;
            }
            let Ok(name) = s.name() else { continue };
            if name.is_empty() || wanted.is_some_and(|w| !w.contains(name)) {
                continue;
            }
            syms.entry(name.to_owned()).or_insert(ExeSym {
                value: s.address(),
                size: s.size(),
                func: kind == SymbolKind::Text,
                tls: kind == SymbolKind::Tls,
            });
        }
        Ok(ExeSymbols { build_id, syms })
    }
}

/// The build-id (hex) of an ELF file, "" when it has none.
///
/// # Errors
/// `E_WATCH_IO`, `E_WATCH_OBJECT`.
pub fn build_id(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).map_err(|e| io(path.display(), e))?;
    // SAFETY: as in `ExeSymbols::read`: a read-only private map of a file
    // that is replaced by rename, never rewritten in place.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io(path.display(), e))?;
    let file = object::File::parse(&*map).map_err(|e| {
        Error::new(
            E_WATCH_OBJECT,
            format!("{} does not parse: {e}", path.display()),
        )
    })?;
    Ok(file
        .build_id()
        .ok()
        .flatten()
        .map(crate::hex::hex)
        .unwrap_or_default())
}
