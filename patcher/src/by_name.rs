//! Targets found by name: a module of the process and a symbol in it
//! (local, non-exported symbols included), through the symbolizer. The
//! symbol's size bounds the preflight exactly.

use hotpatch_symbolizer::{Module, Registry, RuntimeAddr, find};

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
    pub addr: RuntimeAddr,
    /// Its size from the symbol table, when known.
    pub size: Option<usize>,
}

/// The module `module` names: `None` is the main program; otherwise the
/// symbolizer's one module-name rule ([`hotpatch_symbolizer::find::module_matches`]:
/// a path, a file name, or a library's stem).
fn module_named(reg: &Registry, module: Option<&str>) -> Option<Module> {
    match module {
        None => {
            let exe = hotpatch_sys::phdr::main_program_path();
            let seq = reg.current_seq();
            reg.modules()
                .into_iter()
                .find(|m| m.mapped_at(seq) && m.elf().is_some_and(|e| e.path == exe))
        }
        Some(name) => find::modules_named(reg, name).into_iter().next(),
    }
}

/// Finds `symbol` in `module` (`None`: the main program; else a path or
/// file name of a loaded module, or a library's stem as in
/// `libpricing_v1.so` for `pricing-v1`). Local symbols are found too; Rust symbols
/// match by their demangled path without hash (`crate::module::function`).
///
/// # Errors
/// `E_PATCH_MODULE_NOT_FOUND` when no loaded module matches, `E_PATCH_SYMBOL_NOT_FOUND`
/// when the symbol is not in its symbol tables.
pub fn find(module: Option<&str>, symbol: &str) -> Result<SymbolTarget> {
    let reg = Registry::global();
    let _ = reg.refresh();
    let m = module_named(reg, module).ok_or_else(|| Error::ModuleNotFound {
        module: module.unwrap_or("<main program>").to_string(),
    })?;
    let not_found = |detail: String| Error::SymbolNotFound {
        module: m.name(),
        symbol: symbol.to_string(),
        detail,
    };
    let (_, found) = find::find_in(reg, &[m.id], symbol)
        .map_err(|e| not_found(e.to_string()))?
        .ok_or_else(|| not_found("not in its symbol tables".to_owned()))?;
    Ok(SymbolTarget {
        module: m
            .elf()
            .map(|e| e.path.display().to_string())
            .unwrap_or_default(),
        symbol: symbol.to_string(),
        addr: found.addr,
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
    let report = preflight(t.addr, t.size)?;
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
    replacement: impl Into<RuntimeAddr>,
    opts: &InstallOptions,
) -> Result<Site> {
    let t = find(module, symbol)?;
    let opts = InstallOptions {
        known_size: opts.known_size.or(t.size),
        name: opts.name.clone().or_else(|| Some(symbol.to_string())),
        stop_timeout: opts.stop_timeout,
    };
    // SAFETY: forwarded to the caller (this function's contract).
    unsafe { Site::install(t.addr, replacement, &opts) }
}
