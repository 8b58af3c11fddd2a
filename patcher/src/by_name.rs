//! Targets found by name: a module of the process and a symbol in it
//! (local, non-exported symbols included), through the symbolizer. The
//! symbol's size bounds the preflight exactly.

use std::path::Path;
use std::sync::OnceLock;

use hotpatch_symbolizer::{DebugSearch, Module, Registry, Symbolizer};

use crate::error::{Error, Result};
use crate::preflight::{PreflightReport, preflight};
use crate::site::{InstallOptions, Site};

/// A function found by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolTarget {
    /// The module's path.
    pub module: String,
    /// The symbol name as asked.
    pub symbol: String,
    /// Runtime address of its entry.
    pub addr: usize,
    /// Its size from the symbol table, when known.
    pub size: Option<usize>,
}

fn symbolizer() -> &'static Symbolizer {
    static S: OnceLock<Symbolizer> = OnceLock::new();
    S.get_or_init(|| Symbolizer::new(DebugSearch::default()))
}

/// Whether `m` is the module the caller named: `None` is the main program;
/// otherwise a full path or a file name.
fn matches(m: &Module, module: Option<&str>, exe: Option<&Path>) -> bool {
    let Some(e) = m.elf() else { return false };
    match module {
        None => exe.is_some_and(|x| x == e.path),
        Some(name) => {
            e.path == Path::new(name)
                || e.path
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy() == name)
        }
    }
}

/// Finds `symbol` in `module` (`None`: the main program; else a path or
/// file name of a loaded module). Local symbols are found too; Rust symbols
/// match by their demangled path without hash (`crate::module::function`).
///
/// # Errors
/// `E_PATCH_MODULE_NOT_FOUND` when no loaded module matches, `E_PATCH_SYMBOL_NOT_FOUND`
/// when the symbol is not in its symbol tables.
pub fn find(module: Option<&str>, symbol: &str) -> Result<SymbolTarget> {
    let reg = Registry::global();
    let _ = reg.refresh();
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let seq = reg.current_seq();
    let m = reg
        .modules()
        .into_iter()
        .find(|m| m.mapped_at(seq) && matches(m, module, exe.as_deref()))
        .ok_or_else(|| Error::ModuleNotFound {
            module: module.unwrap_or("<main program>").to_string(),
        })?;
    let found = symbolizer()
        .find_symbol(reg, m.id, symbol)
        .map_err(|e| Error::SymbolNotFound {
            module: m.name(),
            symbol: symbol.to_string(),
            detail: e.to_string(),
        })?;
    Ok(SymbolTarget {
        module: m
            .elf()
            .map(|e| e.path.display().to_string())
            .unwrap_or_default(),
        symbol: symbol.to_string(),
        addr: found.addr.0 as usize,
        size: (found.size > 0).then_some(found.size as usize),
    })
}

/// [`preflight`] of a function found by name, bounded by its symbol size.
///
/// # Errors
/// As [`find`] and [`preflight`].
pub fn preflight_symbol(
    module: Option<&str>,
    symbol: &str,
) -> Result<(SymbolTarget, PreflightReport)> {
    let t = find(module, symbol)?;
    let report = preflight(t.addr as *const u8, t.size)?;
    Ok((t, report))
}

/// Installs a site on a function found by name; its symbol size feeds the
/// preflight and the site is named after the symbol.
///
/// # Safety
/// As [`Site::install`]: `replacement` must have the symbol's exact
/// signature and ABI (a symbol table does not say what it is), and the
/// module must stay loaded while the site lives.
///
/// # Errors
/// As [`find`] and [`Site::install`].
pub unsafe fn install_symbol(
    module: Option<&str>,
    symbol: &str,
    replacement: *const u8,
    opts: &InstallOptions,
) -> Result<Site> {
    let t = find(module, symbol)?;
    let opts = InstallOptions {
        known_size: opts.known_size.or(t.size),
        name: opts.name.clone().or_else(|| Some(symbol.to_string())),
        stop_timeout: opts.stop_timeout,
    };
    // SAFETY: forwarded to the caller (this function's contract).
    unsafe { Site::install(t.addr as *const u8, replacement, &opts) }
}
